"""The flow of a protection run (photos.protect_photos): photos analysed in worker threads,
their faces protected in batches across photos in the calling thread, then finished (encoded,
written) in worker threads, in input order."""
from __future__ import annotations

import concurrent.futures as cf

__all__ = ["Pipeline"]


class Pipeline:
    """Photos flow analyse (threads) -> protect (batched across photos, this thread) -> finish
    (threads), a bounded number of jobs ahead; analyses are taken and outcomes reported in
    input order, so batches and outputs follow it."""

    def __init__(self, pool: cf.ThreadPoolExecutor, n: int, analyse, finish, protect_batch,
                 batch_size: int, workers: int, on_result):
        """`analyse(index)` -> an item with `.faces`, `.deltas`, `.error`, `.index`;
        `protect_batch(waiting)` appends deltas to waiting items; `finish(item)` -> an outcome,
        passed to `on_result` in input order."""
        self.pool, self.n, self.analyse, self.finish = pool, n, analyse, finish
        self.protect_batch, self.on_result = protect_batch, on_result
        self.batch_size = batch_size
        self.lookahead = max(2 * batch_size, 2 * workers)
        self.outcomes: list = [None] * n
        self.analysing: dict[int, cf.Future] = {}     # job index -> future analysed item
        self.waiting: list = []                       # analysed, in order; faces not all protected
        self.finishing: dict[int, cf.Future] = {}     # job index -> future outcome
        self.next_job = self.next_analysed = self.next_report = 0

    def run(self) -> list:
        try:
            while self.next_report < self.n:
                self._submit_ahead()
                self._take_analysed()
                if self._protect_ready():
                    continue
                self._wait()
                self._report_finished()
        finally:
            for future in self.analysing.values():
                future.cancel()
        return self.outcomes

    def _submit_ahead(self) -> None:
        while self.next_job < self.n and self.next_job - self.next_report < self.lookahead:
            self.analysing[self.next_job] = self.pool.submit(self.analyse, self.next_job)
            self.next_job += 1

    def _take_analysed(self) -> None:
        """Analyses done, in input order: photos with faces wait for protection, others finish."""
        while self.next_analysed in self.analysing and self.analysing[self.next_analysed].done():
            item = self.analysing.pop(self.next_analysed).result()
            if item.faces and not item.error:
                self.waiting.append(item)
            else:
                self.finishing[self.next_analysed] = self.pool.submit(self.finish, item)
            self.next_analysed += 1

    def _protect_ready(self) -> bool:
        """One batch of waiting faces, when a full one waits or nothing more is being analysed;
        photos whose faces are all protected go on to finish. True if a batch ran."""
        pending = sum(len(it.faces) - len(it.deltas) for it in self.waiting)
        if not self.waiting or (pending < self.batch_size and self.next_analysed != self.next_job):
            return False
        self.protect_batch(self.waiting)
        for item in [it for it in self.waiting if len(it.deltas) == len(it.faces)]:
            self.finishing[item.index] = self.pool.submit(self.finish, item)
        self.waiting = [it for it in self.waiting if len(it.deltas) < len(it.faces)]
        return True

    def _wait(self) -> None:
        watch = [f for f in (self.analysing.get(self.next_analysed),
                             self.finishing.get(self.next_report)) if f is not None]
        if watch:
            cf.wait(watch, return_when=cf.FIRST_COMPLETED)

    def _report_finished(self) -> None:
        while self.next_report in self.finishing and self.finishing[self.next_report].done():
            self.outcomes[self.next_report] = self.finishing.pop(self.next_report).result()
            if self.on_result:
                self.on_result(self.outcomes[self.next_report])
            self.next_report += 1
