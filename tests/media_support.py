"""Images and sounds made in the test, for the adapters' multimodal tests (no files, no network).

``noise_png(seed)`` is a PNG of random pixels (different seeds: different
images); ``tone_wav(hz)`` is a WAV of a sine tone (different pitches: different
sounds). Both are small enough for the tiny checkpoints' processors (64 px
images, 16 kHz audio) and are decoded by core like any user's file.
"""

from __future__ import annotations

import base64
import io


def noise_png(seed: int, size: int = 64) -> bytes:
    """A ``size`` x ``size`` RGB PNG of random pixels drawn with ``seed``."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def tone_wav(hz: float, seconds: float = 0.5, rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV of a sine tone at ``hz``."""
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    soundfile.write(out, 0.5 * np.sin(2 * np.pi * hz * t), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
