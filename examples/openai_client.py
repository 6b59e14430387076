"""Talk to `cepe serve` with the official openai client: a chat reply, the same streamed, and a
CEPE context passed as an extension field.

    cepe serve --model smollm2-135m-cepe &          # pip install "cepe[serve]"
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse

import openai


def run(base_url: str, question: str, context: str | None) -> tuple[str, str]:
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": question}]
    extra = {"cepe_context": [context]} if context else None
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=48, temperature=0, extra_body=extra
    )
    pieces = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=48, temperature=0, stream=True, extra_body=extra
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return reply.choices[0].message.content or "", "".join(pieces)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--question", default="Name three uses of Python.")
    p.add_argument("--context", default=None, help="a document for a CEPE model's encoder")
    args = p.parse_args(argv)
    reply, streamed = run(args.base_url, args.question, args.context)
    print(reply)
    print("(streamed the same)" if streamed == reply else f"(streamed: {streamed})")


if __name__ == "__main__":
    main()
