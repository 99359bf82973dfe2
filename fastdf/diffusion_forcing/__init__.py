"""Diffusion Forcing toolkit (DESIGN.md §1, §4; issue #4).

- :class:`NoiseSchedule`: cosine / linear / sigmoid schedules over integer levels
  (0 clean .. ``steps`` pure noise), ``add_noise`` with per-frame or per-token levels,
  eps / v / x0 parameterisations, loss weightings, DDIM / DDPM steps per frame.
- :func:`sample_training_levels`, :func:`training_step`: Diffusion Forcing training.
- :func:`scheduling_matrix`, :func:`to_training_levels`: which level each frame is at, per
  sampling row.
- :class:`DFModel` / :class:`DFCache` (:mod:`.protocol`): the interface a causal denoiser
  implements; :func:`check_model` verifies it.
- :class:`Sampler`: sliding-window, KV-cached rollouts past the training horizon, with
  :class:`RewardGuidance` and :class:`HistoryGuidance`.
"""

from .guidance import HistoryGuidance, RewardGuidance
from .matrix import scheduling_matrix, to_training_levels
from .protocol import DFCache, DFModel, check_model
from .sampler import Sampler
from .schedule import NoiseSchedule
from .training import sample_training_levels, training_step

__all__ = [
    "DFCache", "DFModel", "HistoryGuidance", "NoiseSchedule", "RewardGuidance", "Sampler", "check_model",
    "sample_training_levels", "scheduling_matrix", "to_training_levels", "training_step",
]
