/* Split a call over threads: parts 1..n-1 each on a pthread, part 0 on the caller's, then join;
   a part whose thread did not start runs on the caller's too. `parts` is an array of n structs
   of `size` bytes that `worker` takes one of. Used by linear.c and paged_decode.c, whose parts
   are whole outputs / whole sequences, so the bits never depend on n. */
#ifndef AMOE_RUN_PARTS_H
#define AMOE_RUN_PARTS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_THREADS 16

/* linear.c: this process's threads for large calls (amoe_set_linear_threads). */
int amoe_get_linear_threads(void);

static inline void run_parts(void *(*worker)(void *), void *parts, size_t size, int64_t n)
{
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    char *p = parts;
    for (int64_t i = 1; i < n; i++)
        started[i] = pthread_create(&tid[i], NULL, worker, p + i * size) == 0;
    worker(p);
    for (int64_t i = 1; i < n; i++) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            worker(p + i * size);
    }
}

#endif
