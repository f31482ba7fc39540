"""Where the randomness of a private run comes from: the noise and the Poisson sampling.

The guarantee holds only against an adversary who cannot predict these draws. A generator seeded
from a published seed (or any small number) lets anyone replay the run and see exactly which
examples it used, so the privacy engine draws them from secrets by default:

* ``"secret"`` (default): generators whose whole state comes from the OS's entropy pool
  (:func:`secret_generator`), created afresh for every run and never written to any file.
* ``"secure"``: Opacus's secure mode, a cryptographically secure generator (torchcsprng reading
  /dev/urandom) and Gaussian sampling hardened against floating-point attacks.
* ``"seeded"``: the caller's generators, reproducible: for debugging only, not private when the
  seed is known.
"""

from __future__ import annotations

import importlib.util
import secrets

import torch

NOISE_SOURCES = ("secret", "secure", "seeded")

# PyTorch's CPU generator is a Mersenne Twister whose 624 32-bit words sit in ``get_state()`` as
# 624 uint64 slots from byte 24 on (c10's CPUGeneratorImplState). ``manual_seed`` fills them
# from the low 32 bits of the seed, so a seeded CPU generator has only 2**32 possible streams:
# any seed, even one drawn from the OS, could be found by trying them all.
_MT_OFFSET, _MT_WORDS = 24, 624
_PROBE_SEED = 0x5DFA


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose state the caller cannot know or reproduce.

    CPU: all 624 words of the Mersenne Twister state (19968 bits) from :mod:`secrets`, not a
    32-bit seed. CUDA: a 64-bit seed from :mod:`secrets`, the whole key of its Philox generator.
    Neither is a cryptographically secure generator (see ``"secure"``); both make replaying the
    run impossible in practice.
    """
    device = torch.device(device)
    generator = torch.Generator(device)
    if device.type != "cpu":
        return generator.manual_seed(secrets.randbits(64))
    state = generator.manual_seed(_PROBE_SEED).get_state()
    words = state[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS].view(torch.int64)
    if words[0].item() != _PROBE_SEED or words[1].item() != _next_init_word(_PROBE_SEED):
        raise RuntimeError(  # pragma: no cover - only if PyTorch changes its layout
            f"torch {torch.__version__} lays out its generator state differently: sdfa.privacy "
            "cannot seed it from secrets; use privacy_noise 'secure'"
        )
    entropy = torch.frombuffer(bytearray(secrets.token_bytes(4 * _MT_WORDS)), dtype=torch.int32)
    words.copy_(entropy.to(torch.int64) & 0xFFFFFFFF)
    generator.set_state(state)
    return generator


def _next_init_word(seed: int) -> int:
    """The second state word of a Mersenne Twister seeded with ``seed`` (its init recurrence)."""
    return (1812433253 * (seed ^ (seed >> 30)) + 1) & 0xFFFFFFFF


def secure_generator() -> torch.Generator:
    """Opacus's secure-mode generator: torchcsprng reading /dev/urandom."""
    check_secure_available()
    import torchcsprng

    return torchcsprng.create_random_device_generator("/dev/urandom")


def check_secure_available() -> None:
    if importlib.util.find_spec("torchcsprng") is None:
        raise SecureModeUnavailable(
            "privacy noise 'secure' (Opacus's secure_mode) needs torchcsprng, which is not "
            "installed: pip install torchcsprng (it is built for specific torch versions), or "
            "use the default 'secret' noise (see docs/privacy.md for what each protects against)"
        )


class SecureModeUnavailable(ValueError):
    """Secure mode was asked for but torchcsprng is not installed."""
