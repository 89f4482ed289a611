"""open_clip's validation transform in two halves, for extraction: decode, resize and crop
where the images are decoded (loader workers, or the GPU), scale and normalise on the device.

Why: the halves meet at a uint8 image, a quarter of the float32 one, so workers pass 4x less
through shared memory and the host-to-GPU copy shrinks alike, and the float work moves to the
device. With `pil` the result is bit-identical to open_clip's transform (the same PIL
resize and crop, then the same float32 ops: x / 255, (x - mean) / std).

Decoders (`extract.decode`):
- `pil`: PIL decodes, PIL resizes: the reference's path, and the default.
- `torchvision`: libjpeg-turbo (torchvision.io) decodes and torchvision's antialiased uint8
  resize resizes, in the loader's workers: about 2x faster per core than PIL, pixels within one
  level of 255 of it (tests/test_preprocess.py; docs/benchmark.md, "Decoding").
- `device`: torchvision decodes a whole batch on the extraction device (nvjpeg on CUDA; images
  that are not JPEG are decoded on the host), and resizes there: the workers only read bytes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from pipeline.config import Decoder
from pipeline.errors import PipelineError

JPEG_MAGIC = b"\xff\xd8"


@dataclass(frozen=True)
class Preprocess:
    """open_clip's validation transform of a CLIP spec's `preprocess` settings, split at the uint8 image."""
    spec: dict  # the CLIP spec (pipeline.models.clip): its `preprocess` settings
    decode: Decoder = "pil"

    @classmethod
    def of(cls, spec: dict, decode: Decoder = "pil") -> "Preprocess":
        made = cls(spec, decode)
        if decode != "pil":
            made._check_tensor_geometry()
        return made

    @functools.cached_property
    def _transform(self):
        from pipeline.models.clip import preprocess_for

        return preprocess_for(self.spec)

    @functools.cached_property
    def _geometry(self) -> list:
        """The transform's steps before its conversion to float (resize, crop, RGB)."""
        steps = self._transform.transforms
        return steps[:next(i for i, s in enumerate(steps) if type(s).__name__ in ("MaybeToTensor", "ToTensor"))]

    @functools.cached_property
    def _normalize(self):
        return self._transform.transforms[-1]

    def _check_tensor_geometry(self) -> None:
        try:
            self._resize(torch.zeros(3, 40, 30, dtype=torch.uint8))
        except Exception as exc:
            raise PipelineError(f"extract.decode: {self.decode} cannot run this model's preprocessing "
                                f"({self._transform.transforms[0]}) on tensors ({exc}): use extract.decode: pil"
                                ) from None

    @property
    def reads_bytes(self) -> bool:
        """Whether the dataset hands this transform the compressed bytes instead of a PIL image."""
        return self.decode != "pil"

    def _resize(self, image):
        for step in self._geometry:
            image = _on_tensor(step, image) if isinstance(image, torch.Tensor) else step(image)
        return image

    def __call__(self, image: Image.Image | bytes) -> torch.Tensor:
        """The host half, in the loader's workers: a uint8 (3, H, W) image, or (`device`) the bytes."""
        if self.decode == "pil":
            picture = np.array(self._resize(image), dtype=np.uint8, copy=True)
            return torch.from_numpy(picture).permute(2, 0, 1).contiguous()
        raw = torch.frombuffer(bytearray(image), dtype=torch.uint8)
        return raw if self.decode == "device" else self._resize(_decode(raw, "cpu"))

    def collate(self, items: list[torch.Tensor]):
        """Images stack into a batch; compressed bytes (different lengths) travel as a list."""
        return list(items) if self.decode == "device" else default_collate(items)

    def pixels(self, batch, device: torch.device) -> torch.Tensor:
        """A loader's batch as uint8 images on `device` (`device`: decoded and resized there)."""
        if self.decode == "device":
            return torch.stack([self._resize(image) for image in _decode_batch(batch, device)])
        return batch.to(device, non_blocking=True)

    def finish(self, batch, device: torch.device) -> torch.Tensor:
        """The device half: the pixels, then x / 255 and (x - mean) / std in float32, as ToTensor
        and Normalize compute them."""
        from torchvision.transforms.functional import normalize

        norm = self._normalize  # in place: bit-identical, without Normalize's copy
        return normalize(self.pixels(batch, device).float().div_(255), norm.mean, norm.std, inplace=True)


def _decode(raw: torch.Tensor, device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if bytes(raw[:2]) == JPEG_MAGIC:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    return decode_image(raw, mode=ImageReadMode.RGB).to(device)


def _decode_batch(raws: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEGs in one batched call on the device (nvjpeg on CUDA), the others one by one on the host."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg = [i for i, raw in enumerate(raws) if bytes(raw[:2]) == JPEG_MAGIC]
    images = [None if bytes(raw[:2]) == JPEG_MAGIC else _decode(raw, device) for raw in raws]
    if jpeg:
        try:
            decoded = decode_jpeg([raws[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            raise PipelineError(f"extract.decode: device could not decode a JPEG of this batch ({exc}); "
                                "extract.decode: torchvision names the image that fails") from None
        for i, image in zip(jpeg, decoded):
            images[i] = image
    return images


def _on_tensor(step, image: torch.Tensor) -> torch.Tensor:
    """A PIL-era transform step on a uint8 tensor, by torchvision's v2 kernels (the uint8 resize
    that follows PIL's antialiased filters; v1's converts to float first)."""
    from torchvision.transforms import CenterCrop, Resize
    from torchvision.transforms.v2 import functional as F

    if type(step) is Resize:
        return F.resize(image, step.size, step.interpolation, step.max_size, antialias=step.antialias)
    if type(step) is CenterCrop:
        return F.center_crop(image, step.size)
    return step(image)  # open_clip's MaybeConvertMode passes tensors through; others may not take them
