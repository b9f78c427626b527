/* Allocator context (sbatch, salloc, srun on the submit host): checks the options together. */
#ifndef SLINFER_ALLOCATOR_H
#define SLINFER_ALLOCATOR_H

/* After all options are parsed: 0 when they go together, -1 (after printing why) otherwise. */
int slinfer_allocator_check(void);

#endif
