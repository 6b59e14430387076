"""Types of cepe_c, the CPython module over the C core (cepe_c/*.c). cepe/ is its only user;
checked against the built module by mypy's stubtest (tests/test_ux_typing.py)."""

from typing import Any, final, type_check_only

import numpy as np
from numpy.typing import NDArray

_F32 = NDArray[np.float32]

@final
class Model:
    """A decoder in the C core; weights are borrowed from the bound arrays."""

    @property
    def backend(self) -> str: ...
    def __init__(
        self,
        decoder: dict[str, Any],
        encoder: dict[str, Any] | None = ...,
        n_threads: int = ...,
        backend: Any = ...,
        bf16: bool = ...,
    ) -> None: ...
    def bind(self, name: str, array: NDArray[Any], /) -> None: ...
    def finalize(self) -> None: ...
    def encode(self, ids: NDArray[np.int32], mask: NDArray[np.uint8] | None = ..., /) -> _F32: ...

@final
class Context:
    """Per-request state of a Model: KV cache and scratch. single_pass: a cache of one layer, for
    one forward call that is not continued."""

    @property
    def batch(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    def __init__(self, model: Model, batch: int, capacity: int, *, single_pass: bool = ...) -> None: ...
    def forward(
        self,
        ids: NDArray[np.int32],
        positions: NDArray[np.float64] | None,
        mask: NDArray[np.uint8] | None,
        logits_mode: int,
        /,
    ) -> _F32: ...
    def forward_nll(
        self,
        ids: NDArray[np.int32],
        positions: NDArray[np.float64] | None,
        mask: NDArray[np.uint8] | None,
        targets: NDArray[np.int32],
        /,
    ) -> _F32: ...
    def generate(self, sampler: Sampler, max_new_tokens: int, top_logprobs: int = ...) -> Any: ...
    def reset(self) -> None: ...
    def save_state(
        self,
    ) -> tuple[int, _F32, _F32, NDArray[np.uint8], NDArray[np.float64], _F32, _F32, float, int, int, int]: ...
    def load_state(
        self,
        length: int,
        k: _F32,
        v: _F32,
        valid: NDArray[np.uint8],
        next_pos: NDArray[np.float64],
        inv_freq: _F32,
        last_logits: _F32,
        rope_mscale: float,
        rope_cached_len: int,
        rope_len_hint: int,
        has_logits: int,
        /,
    ) -> None: ...
    def set_rope_length(self, seq_len: int, /) -> None: ...
    def set_context(self, states: _F32 | None, mask: NDArray[np.uint8] | None, keep_kv: bool = ..., /) -> None: ...
    def encode_context(
        self, ids: NDArray[np.int32], mask: NDArray[np.uint8] | None, keep_kv: bool = ..., /
    ) -> None: ...
    def interrupt(self) -> None: ...
    def progress(self) -> tuple[int, int]: ...

@final
class Sampler:
    """The sampler chain of the C core, with its random stream and each row's token window."""

    batch: int
    vocab_size: int
    def __init__(
        self,
        batch: int,
        vocab_size: int,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        typical_p: float = ...,
        repeat_penalty: float = ...,
        repeat_last_n: int = ...,
        frequency_penalty: float = ...,
        presence_penalty: float = ...,
        bias_ids: NDArray[np.int32] | None = ...,
        bias: _F32 | None = ...,
        seed: int = ...,
        eos_ids: NDArray[np.int32] | None = ...,
        pad_token_id: int = ...,
        token_text: NDArray[np.uint8] | None = ...,
        token_offsets: NDArray[Any] | None = ...,
        stop_text: NDArray[np.uint8] | None = ...,
        stop_offsets: NDArray[np.int32] | None = ...,
    ) -> None: ...
    def accept(self, ids: NDArray[np.int32], mask: NDArray[np.uint8] | None = ..., /) -> None: ...
    def distribution(self, row: int, logits: _F32, /) -> _F32: ...
    def sample(self, row: int, logits: _F32, top_logprobs: int = ..., /) -> Any: ...
    def finished(self, row: int, /) -> int: ...
    def generated(self, row: int, /) -> int: ...

@type_check_only
class TrainState:
    """A model's trainable weights, their gradients and AdamW moments (train_state())."""

    step: int
    def forward_backward(
        self,
        input_ids: NDArray[Any] | None,
        labels: NDArray[Any] | None = ...,
        attention_mask: NDArray[Any] | None = ...,
        positions: NDArray[Any] | None = ...,
        encoder_input_ids: NDArray[Any] | None = ...,
        encoder_attention_mask: NDArray[Any] | None = ...,
        distill_prob: NDArray[Any] | None = ...,
        distill_index: NDArray[Any] | None = ...,
        grad_scale: float = ...,
    ) -> Any: ...
    def update(self) -> Any: ...
    def zero_grad(self) -> None: ...
    def grads(self) -> _F32: ...
    def grad_buffer(self) -> _F32: ...
    def grad_dlpack(self, device_id: int, /) -> Any: ...
    def sync_host(self) -> None: ...
    def sync_device(self) -> None: ...

def blas_info() -> str: ...
def max_threads() -> int: ...
def set_blas_threads(n: int, /) -> None: ...
def rope_frequencies(settings: dict[str, Any], seq_len: int = ..., /) -> tuple[_F32, float]: ...
def e2llm_positions(
    R: int, L: int, g_max: int, n: int = ..., seed: int = ...
) -> tuple[NDArray[np.float64], NDArray[np.int32], NDArray[np.int32]]: ...
def lr_schedule(base_lr: float, step: int, warmup_ratio: float, total_steps: int) -> float: ...
def adamw_step(
    params: _F32,
    grads: _F32,
    m: _F32,
    v: _F32,
    *,
    step: int = ...,
    lr: float = ...,
    beta1: float = ...,
    beta2: float = ...,
    eps: float = ...,
    weight_decay: float = ...,
    clip: float = ...,
    n_threads: int = ...,
) -> float: ...
def train_layout(core: Model, trainable: str, /) -> tuple[list[tuple[str, tuple[int, ...], int]], int]: ...
def train_state(core: Model, config: dict[str, Any], params: _F32, m: _F32, v: _F32, step: int = ...) -> TrainState: ...
def weight_shapes(core: Model, /) -> list[tuple[str, tuple[int, ...]]]: ...
def train_weights(core: Model, /) -> dict[str, _F32 | tuple[NDArray[np.uint8], int, int]]: ...
def _sim_backend() -> Any: ...
def _op(name: str, backend: Any, /, **args: Any) -> None: ...

IGNORE_INDEX: int
KL_DROP: int
KL_SMOOTH: int
NORM_CHUNK: int

_core_api: Any
