"""Do deviceless TPU compiles of distinct shapes overlap in threads, as Encoder.prepare runs them? Compiles pairs of
distinct full-size encode steps serially and in 2 threads (fresh shapes each time: JAX caches compiles in-process),
alternating the order, and times lowering (Python, under its lock) against compiling (XLA, without it).

    JAX_PLATFORMS=cpu python benchmarks/tpu_compile_threads.py --target v5e:2x2 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from m3jax import accelerators, pipeline  # noqa: E402
from m3jax.config import M3Config  # noqa: E402
from m3jax.engine import Encoder, compile_plan  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="v5e:2x2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lengths", default="256,384", help="one shape per length in each pair")
    args = p.parse_args()
    devices = accelerators.host_devices(accelerators.compile_only_devices(args.target))
    enc = Encoder(M3Config.bge_m3(), None, None, dtype="bfloat16", devices=devices, max_tokens_per_batch=1 << 30)
    enc.executable(16, len(devices))  # tracing caches warm
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = iter(range(1024, 0, -len(devices)))
    times: dict[str, list[float]] = {"serial": [], "threads": []}
    for rep in range(args.repeats):
        for mode in ("serial", "threads") if rep % 2 == 0 else ("threads", "serial"):
            shapes = [(L, next(rows)) for L in lengths]
            t0 = time.perf_counter()
            if mode == "serial":
                for s in shapes:
                    enc.executable(*s)
            else:
                with ThreadPoolExecutor(len(shapes)) as pool:
                    list(pool.map(lambda s: enc.executable(*s), shapes))
            times[mode].append(time.perf_counter() - t0)
            print(f"repeat {rep} {mode:<7}: {times[mode][-1]:.1f} s for {shapes}", flush=True)
    L, r = lengths[0], next(rows)
    _, static = enc._step_key(L, r, pipeline.HEADS, None, ())
    spec = jax.ShapeDtypeStruct((r, L), "int32", sharding=enc.row_sharding)
    t0 = time.perf_counter()
    with jax.set_mesh(enc.mesh):
        lowered = pipeline.encode_step.lower(enc.graphdef, enc.state, spec, spec, **static,
                                             projections=compile_plan(enc.platform, L, None, enc.dtype)[1])
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(f"{args.target}, {os.cpu_count()} CPUs: serial {sorted(times['serial'])} s, {len(lengths)} threads "
          f"{sorted(times['threads'])} s; one shape: lowering {t1 - t0:.2f} s, compiling {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
