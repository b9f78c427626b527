/*
 * Fake of the SPANK host API for the unit-test harness. In production these symbols come from
 * the process that loads the plugin (sbatch, srun, slurmd, slurmstepd), which a unit test
 * cannot be; the real callbacks are exercised on a Slurm bed instead (see ../README.md).
 */
#ifndef SLINFER_FAKE_SPANK_H
#define SLINFER_FAKE_SPANK_H

#include <slurm/spank.h>

#define FAKE_MAX_OPTIONS 8

struct fake_spank {
	struct spank_option registered[FAKE_MAX_OPTIONS];
	int nregistered;
	spank_err_t register_rc;   /* what spank_option_register answers */
	char last_error[4096];     /* last slurm_error() line */
	int nerrors;
	char last_info[4096];      /* last slurm_info() line */
	int ninfos;
};

extern struct fake_spank fake;

void fake_reset(void);

#endif
