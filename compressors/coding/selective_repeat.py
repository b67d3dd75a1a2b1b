"""SR-SGC: gradient coding with selective repetition (Krishnan, Ebrahimi, Khisti, ICLR 2023, Scheme 1).

docs/algorithms.md §6.2. With ``W − 1 = x·B`` the scheme uses an (n, s) gradient code with
``s = ⌈B·λ/(W − 1 + B)⌉`` and delay ``T = B``:

* round t: every worker computes its coded task for job t, except that when ``v > s``
  workers have not delivered job ``t − B``, ``v − s`` of them compute their job-(t − B)
  task again instead;
* job t is decodable once ``n − s`` distinct workers delivered its task (in round t or
  round t + B) and is decoded with the code's decoder (§5.3).

Which ``v − s`` workers repeat is not fixed by the description (the reference simulator
takes the lowest-indexed missing workers). We take the workers that straggled in round
``t − B`` first — under the model they cannot straggle again in round t, which would be a
burst spanning B + 1 ≤ W rounds — and then the lowest-indexed of the others (workers that
were busy repeating an older job in round t − B).

Load per worker per round: one coded task, ``(s + 1)/n`` of a job's data.
"""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction

from gradwire.compressors.coding.constructions import default_code
from gradwire.compressors.coding.gradient_code import GradientCode
from gradwire.compressors.coding.sgc import RoundScheduler, SequentialScheme, check_code, check_sgc_params
from gradwire.compressors.coding.tasks import CODED, Contribution, Task


class SelectiveRepeatSGC(SequentialScheme):
    """SR-SGC for the (B, W, λ)-bursty model; see the module docstring."""

    name = "sr-sgc"

    def __init__(self, n: int, B: int, W: int, lam: int, *, code: GradientCode | None = None, seed: int = 0):
        check_sgc_params(n, B, W, lam)
        n, B, W, lam = int(n), int(B), int(W), int(lam)
        if (W - 1) % B:
            raise ValueError(f"SR-SGC needs B to divide W - 1; got B={B}, W={W} (W - 1 = {W - 1})")
        s = -(-B * lam // (W - 1 + B))  # ⌈Bλ/(W − 1 + B)⌉
        if s >= n:
            raise ValueError(
                f"SR-SGC with n={n}, B={B}, W={W}, lam={lam} needs an (n, s={s}) gradient code, "
                f"which requires s < n; use more workers"
            )
        self.n, self.B, self.W, self.lam, self.s = n, B, W, lam, s
        if code is None:
            code = default_code(n, s, seed)
        check_code(code, n, s, "SR-SGC")
        self.code: GradientCode = code
        self.delay = B
        self.load = Fraction(s + 1, n)
        self.partition_sizes = (Fraction(1, n),) * n
        self._weights = [tuple(code.encode_weights(i).items()) for i in range(n)]
        self._loads = [Fraction(len(code.partitions(i)), n) for i in range(n)]

    def task(self, job: int, worker: int) -> Task:
        """Worker ``worker``'s coded task for ``job``: row ``worker`` of the code's matrix."""
        return Task(job, CODED, 0, self._weights[worker], self._loads[worker])

    def scheduler(self, num_jobs: int | None = None) -> SelectiveRepeatScheduler:
        return SelectiveRepeatScheduler(self, num_jobs)


class SelectiveRepeatScheduler(RoundScheduler):
    """The SR-SGC master (docs/algorithms.md §6.2)."""

    scheme: SelectiveRepeatSGC

    def __init__(self, scheme: SelectiveRepeatSGC, num_jobs: int | None) -> None:
        super().__init__(scheme, num_jobs)
        self._delivered: defaultdict[int, list[tuple[int, int, Task]]] = defaultdict(list)

    def _repeaters(self, old: int) -> set[int]:
        """The ``v − s`` workers that redo job ``old`` (see the module docstring for the order)."""
        done = {worker for _, worker, _ in self._delivered.get(old, [])}
        missing = [w for w in range(self.n) if w not in done]
        excess = len(missing) - self.scheme.s
        if excess <= 0:
            return set()
        late = self._stragglers[old]
        return set(sorted(missing, key=lambda w: (w not in late, w))[:excess])

    def _plan(self, r: int) -> list[list[Task]]:
        scheme = self.scheme
        old = r - scheme.B
        repeaters = self._repeaters(old) if self.has_job(old) else set()
        plan: list[list[Task]] = []
        for worker in range(self.n):
            if worker in repeaters:
                plan.append([scheme.task(old, worker)])
            elif self.has_job(r):
                plan.append([scheme.task(r, worker)])
            else:
                plan.append([])
        return plan

    def _record(self, r: int, worker: int, task: Task) -> None:
        self._delivered[task.job].append((r, worker, task))

    def _is_decodable(self, job: int) -> bool:
        return len(self._delivered.get(job, [])) >= self.n - self.scheme.s

    def _combination(self, job: int) -> list[Contribution]:
        results = self._delivered[job]
        coefficients = self.scheme.code.decode([worker for _, worker, _ in results])
        return [
            Contribution(r, worker, task, coefficient)
            for (r, worker, task), coefficient in zip(results, coefficients.tolist())
        ]


def sr_sgc(
    n: int, B: int, W: int, lam: int, *, code: GradientCode | None = None, seed: int = 0
) -> SelectiveRepeatSGC:
    """SR-SGC for n workers under the (B, W, λ)-bursty model; delay B, load ⌈Bλ/(W−1+B)⌉+1 over n.

    ``code`` overrides the (n, s) gradient code (default: FR when (s + 1) | n, else CR drawn
    with ``seed``).
    """
    return SelectiveRepeatSGC(n, B, W, lam, code=code, seed=seed)
