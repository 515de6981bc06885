/* A call split into shares (one plan each: rows of a gate update, tiles of a convolution) run
   on OpenMP's threads. native_build links the OpenMP runtime torch itself runs on, so the
   shares go to torch's own intra-op workers, which are awake (spinning) after torch's last
   parallel op. A second pool of threads (Python's, as before) had to wait for a core those
   workers held: on 2 cores cpu-m's forward ran 14.3 ms on 2 threads against 8.6-9.7 ms with
   the workers told not to spin (OMP_WAIT_POLICY=PASSIVE), 11.8 ms on one thread.
   Built without OpenMP (no runtime in the process), tcl_parallel_threads says 0 and the
   Python side keeps its pool. */

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
int tcl_thread_index(void) { return omp_get_thread_num(); }
int tcl_thread_count(void) { return omp_get_num_threads(); }
#else
int tcl_thread_index(void) { return 0; }
int tcl_thread_count(void) { return 1; }
#endif

typedef void *ptr;

/* One share: the entry point `fn` names (enum tcl_parallel_fn) on plan with its n args. */
static int call_one(int fn, const void *plan, ptr const *a) {
    switch (fn) {
    case TCL_GATE_FORWARD:
        tcl_gate_forward(plan, a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
        return 0;
    case TCL_GATE_BACKWARD:
        tcl_gate_backward(plan, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]);
        return 0;
    case TCL_WINOGRAD3X3:
        return tcl_winograd3x3(plan, a[0], a[1], a[2], a[3], a[4], a[5]) != 0;
    case TCL_WINOGRAD_WEIGHT_GRAD:
        return tcl_winograd_weight_grad(plan, a[0], a[1], a[2], a[3], a[4]) != 0;
    default:
        return 1;
    }
}

/* fn on each of n plans, share k with args[k * n_args ...] (the Python side repeats the
   arguments all shares have in common), one share per thread. 0 when every share ran; else
   the number that declined (or an unknown fn). */
int tcl_parallel(int fn, i64 n, const void *const *plans, ptr const *args, i64 n_args) {
    int declined = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)n) schedule(static, 1) reduction(+ : declined)
#endif
    for (i64 k = 0; k < n; ++k) declined += call_one(fn, plans[k], args + k * n_args);
    return declined;
}

/* Whether tcl_parallel runs its shares on threads (built with OpenMP): 1, else 0. */
int tcl_parallel_threads(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
