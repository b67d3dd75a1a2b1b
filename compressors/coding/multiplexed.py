"""M-SGC: multiplexed sequential gradient coding (Krishnan, Ebrahimi, Khisti, ICLR 2023, Scheme 2).

docs/algorithms.md §6.3. Delay ``T = W − 2 + B``. A job's data is ``D1 ∪ D2``:

* D1: ``n`` equal parts, part ``i`` belongs to worker ``i`` and is cut into ``W − 1``
  uncoded mini-tasks;
* D2: ``B`` equal groups; each group is cut into ``n`` partitions and encoded with an
  (n, λ) gradient code, so a worker's coded task covers ``λ + 1`` of them (D2 is empty
  when λ = n).

Every mini-task reads the same amount ``ℓ`` of data, so
``ℓ = (λ+1) / (n·(B + (W−1)(λ+1)))`` (``1/(n(W−1))`` when λ = n).

Each worker has ``W − 1 + B`` slots per round; slot ``m`` of round ``r`` serves job ``r − m``.
Slots ``m < W − 1`` compute the worker's lowest-numbered D1 mini-task of that job not yet
delivered. Slot ``m = W − 1 + g`` computes the worker's coded task for D2 group ``g`` if the
worker has delivered all its D1 mini-tasks of the job, and otherwise redoes its
lowest-numbered missing D1 mini-task (the adaptive rule). When λ = n such a slot has no
coded task and stays idle once D1 is complete.

Job t is decodable once every worker delivered all ``W − 1`` of its D1 mini-tasks and every
D2 group has coded results from at least ``n − λ`` workers.

Normalised load (per worker per round, fraction of one job's data):
``L = (λ+1)(W−1+B) / (n(B + (W−1)(λ+1)))`` for λ < n and ``(W−1+B)/(n(W−1))`` for λ = n.
For λ < n every slot always holds a mini-task, so the measured load equals L in every round
whose W − 1 + B jobs all exist; for λ = n, L is what a worker must be provisioned for and
idle slots make the measured load ≤ L.
"""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction

from gradwire.compressors.coding.constructions import default_code
from gradwire.compressors.coding.gradient_code import GradientCode
from gradwire.compressors.coding.sgc import RoundScheduler, SequentialScheme, check_code, check_sgc_params
from gradwire.compressors.coding.tasks import GROUP, UNCODED, Contribution, Task


def m_sgc_load(n: int, B: int, W: int, lam: int) -> Fraction:
    """The paper's normalised M-SGC load (docs/algorithms.md §6.3), as an exact fraction."""
    check_sgc_params(n, B, W, lam)
    if lam == n:
        return Fraction(W - 1 + B, n * (W - 1))
    return Fraction((lam + 1) * (W - 1 + B), n * (B + (W - 1) * (lam + 1)))


class MultiplexedSGC(SequentialScheme):
    """M-SGC for the (B, W, λ)-bursty model; see the module docstring."""

    name = "m-sgc"

    def __init__(self, n: int, B: int, W: int, lam: int, *, code: GradientCode | None = None, seed: int = 0):
        check_sgc_params(n, B, W, lam)
        n, B, W, lam = int(n), int(B), int(W), int(lam)
        self.n, self.B, self.W, self.lam = n, B, W, lam
        self.delay = W - 2 + B
        self.slots = W - 1 + B
        self.load = m_sgc_load(n, B, W, lam)
        if lam < n:
            self.minitask_size = Fraction(lam + 1, n * (B + (W - 1) * (lam + 1)))
            if code is None:
                code = default_code(n, lam, seed)
            check_code(code, n, lam, "M-SGC's D2 groups")
        else:
            self.minitask_size = Fraction(1, n * (W - 1))
            if code is not None:
                raise ValueError(f"M-SGC with lam = n = {n} has no coded part; do not pass a code")
        self.code: GradientCode | None = code
        d1 = (self.minitask_size,) * (n * (W - 1))
        d2 = (self.minitask_size / (lam + 1),) * (n * B) if code is not None else ()
        self.partition_sizes = d1 + d2
        rows = [code.encode_weights(w) for w in range(n)] if code is not None else []
        self._d2_weights = [
            [tuple((self.d2_partition(g, j), x) for j, x in row.items()) for g in range(B)] for row in rows
        ]

    def d1_partition(self, worker: int, k: int) -> int:
        """Partition id of mini-task ``k`` of worker ``worker``'s D1 part."""
        return worker * (self.W - 1) + k

    def d2_partition(self, group: int, j: int) -> int:
        """Partition id of partition ``j`` of D2 group ``group``."""
        return self.n * (self.W - 1) + group * self.n + j

    def d1_task(self, job: int, worker: int, k: int) -> Task:
        return Task(job, UNCODED, k, ((self.d1_partition(worker, k), 1.0),), self.minitask_size)

    def d2_task(self, job: int, worker: int, group: int) -> Task:
        if self.code is None:
            raise ValueError("M-SGC with lam = n has no D2 groups")
        weights = self._d2_weights[worker][group]
        return Task(job, GROUP, group, weights, len(weights) * self.minitask_size / (self.lam + 1))

    def scheduler(self, num_jobs: int | None = None) -> MultiplexedScheduler:
        return MultiplexedScheduler(self, num_jobs)


class MultiplexedScheduler(RoundScheduler):
    """The M-SGC master (docs/algorithms.md §6.3)."""

    scheme: MultiplexedSGC

    def __init__(self, scheme: MultiplexedSGC, num_jobs: int | None) -> None:
        super().__init__(scheme, num_jobs)
        self._d1: defaultdict[tuple[int, int], dict[int, tuple[int, Task]]] = defaultdict(dict)
        self._d2: defaultdict[tuple[int, int], list[tuple[int, int, Task]]] = defaultdict(list)
        # one template per (worker, group); a slot copies it with its job number
        self._d2_tasks = (
            [[scheme.d2_task(0, w, g) for g in range(scheme.B)] for w in range(scheme.n)]
            if scheme.code is not None
            else None
        )

    def _slot_task(self, job: int, worker: int, m: int) -> Task | None:
        scheme = self.scheme
        done = self._d1.get((job, worker), {})
        d1_count = scheme.W - 1
        if m < d1_count or len(done) < d1_count:
            k = next(k for k in range(d1_count) if k not in done)
            return scheme.d1_task(job, worker, k)
        if self._d2_tasks is None:
            return None  # lam = n: nothing coded to do
        template = self._d2_tasks[worker][m - d1_count]
        return Task(job, GROUP, template.index, template.weights, template.load)

    def _plan(self, r: int) -> list[list[Task]]:
        plan: list[list[Task]] = []
        for worker in range(self.n):
            tasks = []
            for m in range(self.scheme.slots):
                if self.has_job(r - m):
                    task = self._slot_task(r - m, worker, m)
                    if task is not None:
                        tasks.append(task)
            plan.append(tasks)
        return plan

    def _record(self, r: int, worker: int, task: Task) -> None:
        if task.kind == UNCODED:
            self._d1[(task.job, worker)][task.index] = (r, task)
        else:
            self._d2[(task.job, task.index)].append((r, worker, task))

    def _is_decodable(self, job: int) -> bool:
        scheme = self.scheme
        if any(len(self._d1.get((job, w), {})) < scheme.W - 1 for w in range(self.n)):
            return False
        if scheme.code is None:
            return True
        return all(len(self._d2.get((job, g), [])) >= self.n - scheme.lam for g in range(scheme.B))

    def _combination(self, job: int) -> list[Contribution]:
        scheme = self.scheme
        out = [
            Contribution(r, worker, task, 1.0)
            for worker in range(self.n)
            for _, (r, task) in sorted(self._d1[(job, worker)].items())
        ]
        if scheme.code is not None:
            for group in range(scheme.B):
                results = self._d2[(job, group)]
                coefficients = scheme.code.decode([worker for _, worker, _ in results])
                out += [
                    Contribution(r, worker, task, coefficient)
                    for (r, worker, task), coefficient in zip(results, coefficients.tolist())
                ]
        return out


def m_sgc(
    n: int, B: int, W: int, lam: int, *, code: GradientCode | None = None, seed: int = 0
) -> MultiplexedSGC:
    """M-SGC for n workers under the (B, W, λ)-bursty model; delay W − 2 + B.

    ``code`` overrides the (n, λ) gradient code of the D2 groups (default: FR when
    (λ + 1) | n, else CR drawn with ``seed``).
    """
    return MultiplexedSGC(n, B, W, lam, code=code, seed=seed)
