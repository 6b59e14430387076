/* rope_backward.c — backward of rope_forward (rope.c), in place. Each pair
 * was multiplied by [[c, -s], [s, c]]; its gradient is multiplied by the
 * transpose. Same pair layouts as the forward. */
#include "elementwise_backward.h"
#include "ops_backward.h"

void rope_backward(float *dx, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half,
                   int interleaved) {
    const int step = interleaved ? 2 : 1, other = interleaved ? 1 : half;
    for (int i = 0; i < N; i++) {
        const float *c = cos_t + (long)i * half, *s = sin_t + (long)i * half;
        for (int h = 0; h < nh; h++) {
            float *v = dx + ((long)i * nh + h) * hd;
            for (int j = 0; j < half; j++)
                cepe_rope_rotate_backward(&v[j * step], &v[j * step + other], c[j], s[j]);
        }
    }
}
