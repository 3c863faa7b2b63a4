"""What the sampler's set-up sends between devices: prompts' rows repeated, or gathered.

The sampler prefills B prompts once and turns their KV cache and last logits into the
N = B x num_samples rows it decodes, split over the mesh's batch axes (padded to a multiple
of them). Two ways, compiled side by side for a TPU slice by the TPU compiler on this host
(no TPU needed; ``pip install "gfn-jax[tpu]"``) and read with ``gfn_jax.comms``:

* ``repeat``: ``jnp.repeat`` the prompt rows, then pad by repeating the first rows;
* ``gather``: each device gathers its own rows from the prompts' cache, held whole.

The sampler uses ``repeat`` when no padding is needed and ``gather`` otherwise
(``gfn_jax.sampling._prompt_rows``). SmolLM2-135M's shape (float32), 21-token prompts,
3 new tokens (the main job's rng task), draws of 1 x 1000 (the main job's evaluation),
1 x 1024, 3 x 16, 16 x 8 and 64 x 16 rows. Prints, per mesh and draw, the collective
bytes per device of one sampler call outside its decode loop (the part the two ways
change), per decode step, and the sampler's temporaries.

    python benchmarks/sampler_row_traffic.py [--target v4-32] [--meshes 16x1,4x4,1x16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DRAWS = [(1, 1000), (1, 1024), (3, 16), (16, 8), (64, 16)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="v4-32")
    ap.add_argument("--meshes", default="16x1,4x4,1x16", help="data x fsdp, comma-separated")
    ap.add_argument("--draws", default=",".join(f"{b}x{k}" for b, k in DRAWS))
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    from gfn_jax import memory, parallel, sampling, targets
    from gfn_jax.models.config import ModelConfig

    target = targets.parse_target(args.target)
    devs = target.devices()
    print(f"target {target.describe()}")
    smollm2 = ModelConfig(family="llama", vocab_size=49152, d_model=576, n_layers=30,
                          n_heads=9, n_kv_heads=3, d_ff=1536, max_seq_len=2048,
                          tie_embeddings=True)
    mib = 2 ** 20
    print("| mesh | draw (B x k) | rows | way | set-up traffic | per decode step | "
          "sampler temporaries |")
    print("|---|---|---:|---|---:|---:|---:|")
    t0 = time.time()
    for mesh_spec in args.meshes.split(","):
        data, fsdp = (int(x) for x in mesh_spec.split("x"))
        mesh = parallel.make_mesh(parallel.MeshConfig(data=data, fsdp=fsdp, tensor=1), devs)
        for draw in args.draws.split(","):
            B, k = (int(x) for x in draw.split("x"))
            rows = B * k + (-(B * k)) % (data * fsdp)
            for way in ("repeat", "gather"):
                sampling._ROWS_BY = way
                jax.clear_caches()  # the way is read when the sampler is traced
                try:
                    e = memory.estimate_sampler_memory(smollm2, prompts=B, num_samples=k,
                                                       prompt_len=21, traj_len=3, mesh=mesh)
                finally:
                    sampling._ROWS_BY = "auto"
                c = e.comms
                used = way == ("repeat" if rows == B * k else "gather")
                print(f"| data={data} fsdp={fsdp} | {B} x {k} | {rows} | {way}"
                      f"{' (used)' if used else ''} | {c.total_device_bytes / mib:.1f} MiB | "
                      f"{c.per_iteration_bytes / mib:.1f} MiB | {e.temp_bytes / mib:.0f} MiB |",
                      flush=True)
    print(f"\nwall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
