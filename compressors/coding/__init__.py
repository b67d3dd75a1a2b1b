"""gradwire.compressors.coding — straggler-tolerant gradient codes (docs/algorithms.md §5–6).

Gradient codes (Tandon et al., ICML 2017)::

    code = cyclic_repetition(n=8, s=2)        # or fractional_repetition(8, 1)
    code.partitions(i)                         # data partitions worker i computes
    code.encode_weights(i)                     # its message is Σ_j w_j g_j
    a = code.decode(survivors)                 # Σ a_k m_{survivors[k]} = Σ_j g_j

Sequential gradient codes (Krishnan, Ebrahimi, Khisti, ICLR 2023)::

    scheme = m_sgc(n=8, B=1, W=3, lam=2)       # or sr_sgc(...)
    scheduler = scheme.scheduler()
    tasks = scheduler.assign(r); scheduler.report(r, stragglers); scheduler.combination(job)
    simulate(scheme, Bursty(1, 3, 2, seed=0).pattern(100, 8))

Only torch and numpy are needed.
"""

from gradwire.compressors.coding.barrier import RoundBarrier, StoreRoundBarrier
from gradwire.compressors.coding.coded_round import CodedRound, ComputeCancelled, RoundReport, coded_gradient
from gradwire.compressors.coding.constructions import cyclic_repetition, fractional_repetition
from gradwire.compressors.coding.gradient_code import GradientCode, UndecodableError
from gradwire.compressors.coding.multiplexed import MultiplexedScheduler, MultiplexedSGC, m_sgc, m_sgc_load
from gradwire.compressors.coding.selective_repeat import SelectiveRepeatScheduler, SelectiveRepeatSGC, sr_sgc
from gradwire.compressors.coding.sgc import RoundScheduler, SequentialScheme
from gradwire.compressors.coding.simulate import SimulationResult, simulate
from gradwire.compressors.coding.stragglers import (
    Bernoulli,
    Bursty,
    NoStragglers,
    StragglerModel,
    extends_admissibly,
    is_admissible,
)
from gradwire.compressors.coding.tasks import Contribution, Task

__all__ = [
    "Bernoulli",
    "Bursty",
    "CodedRound",
    "ComputeCancelled",
    "Contribution",
    "GradientCode",
    "MultiplexedSGC",
    "MultiplexedScheduler",
    "NoStragglers",
    "RoundBarrier",
    "RoundReport",
    "RoundScheduler",
    "SelectiveRepeatSGC",
    "SelectiveRepeatScheduler",
    "SequentialScheme",
    "SimulationResult",
    "StoreRoundBarrier",
    "StragglerModel",
    "Task",
    "UndecodableError",
    "coded_gradient",
    "cyclic_repetition",
    "extends_admissibly",
    "fractional_repetition",
    "is_admissible",
    "m_sgc",
    "m_sgc_load",
    "simulate",
    "sr_sgc",
]
