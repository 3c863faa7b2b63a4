"""The paper's continuation sweep over the final reward temperature (Hu et al. 2024, Sec. 4.1:
the reward temperature anneals from 1.0 to T_end, and T_end is swept around 0.8-0.95).

Each run is configs/continuation.py with one value of reward.temp_end; the plot shows the mean
penalised base log-likelihood log p~(Z T | X) of the tuned policy's held-out samples against
T_end (diversity: the embedding_diversity and distinct_* columns of summary.csv).

    gfn-jax sweep expand configs/sweeps/continuation_temperature.py
    gfn-jax sweep run configs/sweeps/continuation_temperature.py        # here, one by one
    gfn-jax sweep emit configs/sweeps/continuation_temperature.py --launcher slurm \
        --launcher-args "--nodes=1 --gpus-per-node=1"
    gfn-jax sweep summary runs/sweeps/continuation_temperature
(``python -m gfn_jax.sweep ...`` works the same.) The continuation config anneals over
reward.temp_horizon = 750 optimizer updates, as the paper's release does.
"""


def get_sweep():
    return {
        "name": "continuation_temperature",
        "config": "configs/continuation.py",
        "grid": {"reward.temp_end": [0.8, 0.85, 0.9, 0.95]},
        "fixed": {},
        "metric": "after.logp_mean",
        "root": "runs/sweeps/continuation_temperature",
    }
