/* schedule.c — the learning-rate schedule of the reference training runs:
 * HF Trainer's lr_scheduler_type="cosine" (transformers'
 * get_cosine_schedule_with_warmup, num_cycles = 0.5) with warmup_steps =
 * ceil(total_steps * warmup_ratio) (TrainingArguments.get_warmup_steps). */
#include <math.h>

#include "train.h"

#define PI 3.141592653589793 /* math.pi; M_PI is not ISO C */

long cepe_warmup_steps(double warmup_ratio, long total_steps) {
    if (!(warmup_ratio > 0.0) || total_steps <= 0) return 0;
    return (long)ceil((double)total_steps * warmup_ratio); /* same double product as Python's */
}

double cepe_lr_at(double base_lr, long step, long warmup_steps, long total_steps) {
    /* LambdaLR: optimizer step k (0-based) runs at base_lr * lambda(k), so
     * without warmup the very first update already uses the full lr. */
    if (step < warmup_steps) return base_lr * ((double)step / (double)(warmup_steps > 1 ? warmup_steps : 1));
    const long span = total_steps - warmup_steps > 1 ? total_steps - warmup_steps : 1;
    const double progress = (double)(step - warmup_steps) / (double)span;
    const double lambda = 0.5 * (1.0 + cos(PI * 0.5 * 2.0 * progress));
    return base_lr * (lambda > 0.0 ? lambda : 0.0); /* past total_steps the cosine rises again: clamp as HF */
}
