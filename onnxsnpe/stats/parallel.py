"""Work shared out over the cores, results taken in order: how calibration runs its batches and
evaluation its samples.

Each worker thread takes the next item, works on it with its own state (sessions writing into
its own arrays: onnxruntime and the compiled folds release the GIL) and hands the result over;
results are consumed strictly in item order, so float sums come out the same however the items
were shared out. A result waits only until the items before it are done: at most one per worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

Item = TypeVar("Item")
State = TypeVar("State")
Result = TypeVar("Result")


def ordered_map(
    items: Iterable[Item],
    states: list[State],
    work: Callable[[State, int, Item], Result],
    consume: Callable[[int, Result], None],
    name: str = "onnxsnpe-worker",
) -> None:
    """Run ``work(state, index, item)`` for every item, one worker thread per state (this thread
    is the first), and ``consume(index, result)`` in index order. The first error stops every
    worker after its current item and is raised here. ``name`` names the threads."""
    iterator = enumerate(items)
    lock = threading.Lock()
    pending: dict[int, Result] = {}
    done = [0]  # the next index to consume
    failed = threading.Event()
    errors: list[BaseException] = []

    def next_item() -> tuple[int, Item] | None:
        with lock:  # the items may come from a generator, which only one thread may advance
            return None if failed.is_set() else next(iterator, None)

    def run(state: State) -> None:
        while (entry := next_item()) is not None:
            index, item = entry
            result = work(state, index, item)
            with lock:
                pending[index] = result
                while done[0] in pending:
                    consume(done[0], pending.pop(done[0]))
                    done[0] += 1

    def helper(state: State) -> None:
        try:
            run(state)
        except BaseException as exc:  # handed to the calling thread, which raises it
            errors.append(exc)
            failed.set()

    threads = [threading.Thread(target=helper, args=(state,), name=name, daemon=True)
               for state in states[1:]]
    for thread in threads:
        thread.start()
    try:
        run(states[0])
    except BaseException:
        failed.set()
        raise
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
