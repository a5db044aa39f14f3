"""AdaRound's per-layer rounding on a Ray cluster, where its order allows: one task per layer of a wave.

Once a layer's statistics are gathered (its Gram matrix, and with rounded inputs the target they
give), its rounding, the iterations of Adam, needs nothing else: a LayerJob of a few megabytes, no
samples. With ``--adaround-inputs fp32`` every layer's statistics come from the FP32 network in one
pass, so all the layers are one wave and round side by side on the cluster. With rounded inputs (the
default) a layer's statistics need the layers upstream of it already rounded: the waves of
adaround.layer_waves, one after the other, the layers of parallel branches side by side, a chain
one layer at a time (run here: a task would only add its transfer). The statistics passes stay on
the machine that runs the command. A task computes what the in-process rounding computes, in numpy,
so the weights are the same (tested); a task whose worker dies is run again by Ray. Connection and
failures as for calibration (stats/distributed.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..stats.distributed import RETRIES, check_code, code_fingerprint, connect, gather
from .adaround import LayerJob, RoundedLayer, Runner, run_here


def ray_runner(address: str | None = None) -> Runner:
    """A Runner for adaround.adaround that rounds each wave of two or more layers in Ray tasks, one per
    layer, on the cluster at ``address`` (None: a local one); results in order, as each is ready."""
    ray = connect(address)
    task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(_layer_task)

    def run(jobs: Iterable[LayerJob]) -> Iterator[tuple[np.ndarray, RoundedLayer]]:
        jobs = list(jobs)  # a wave's tasks are all submitted at once
        if len(jobs) < 2:
            yield from run_here(jobs)
            return
        refs = [task.remote(job, code_fingerprint()) for job in jobs]
        for ref in refs:  # a failure stops here; the rest run out (gather)
            yield gather(ray, [ref])[0]

    return run


def _layer_task(job: LayerJob, code: str) -> tuple[np.ndarray, RoundedLayer]:
    """In a worker: one layer's codes and record."""
    check_code(code)
    return job.run()
