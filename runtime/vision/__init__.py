"""Image preprocessing for vision-language models, in numpy + PIL only.

Each family's class ports the Hugging Face transformers PIL-backend processor, so
the exported graphs see exactly the tensors HF would give them. The classes take the
manifest's `vision` section (pop.runtime.manifest.Vision; the fields each family reads are
listed in its module's docstring); the fields
every family shares:
    family          "qwen3_vl" | "gemma3"
    image_token     the placeholder a prompt holds for each image
    image_mean, image_std, rescale_factor, resample ("bicubic", "bilinear", ...)
"""
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import PopError

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def processor_for(spec):
    """The preprocessing class of spec.family."""
    # Imported here so that the family modules can use this module's helpers.
    from .gemma3 import Gemma3Images
    from .qwen3_vl import Qwen3VLImages
    classes = {"qwen3_vl": Qwen3VLImages, "gemma3": Gemma3Images}
    family = spec.family
    if family not in classes:
        raise PopError(f"unknown vision family {family!r} in the manifest (known: {', '.join(classes)})")
    return classes[family](spec)


def load_image(image) -> Image.Image:
    """A path or PIL image -> RGB PIL image, transparency composited onto white as HF does."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    try:
        with Image.open(image) as opened:
            opened.load()
            return to_rgb(opened)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("\n")[0]
        raise PopError(f"{image}: not a readable image ({reason})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Port of transformers.image_transforms.convert_to_rgb for PIL images."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def resample_filter(spec):
    """The PIL filter named by spec.resample."""
    name = spec.resample
    if name not in RESAMPLE:
        raise PopError(f"unknown resample filter {name!r} in the manifest (known: {', '.join(RESAMPLE)})")
    return RESAMPLE[name]


def resized_normalized(image: Image.Image, height: int, width: int, spec) -> np.ndarray:
    """Resize, rescale and normalize one image -> float32 [3, height, width], as HF's PilBackend."""
    resized = np.asarray(to_rgb(image).resize((width, height), resample=resample_filter(spec)))
    # HF rescales in float64 and only then drops to float32; normalizing is float32.
    scaled = (resized.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


def split_placeholders(text: str, token: str, num_images: int) -> list:
    """The text around each placeholder; raises PopError unless there is one per image."""
    pieces = text.split(token)
    if len(pieces) - 1 != num_images:
        raise PopError(f"the prompt has {len(pieces) - 1} image placeholder(s) ({token}) "
                       f"but {num_images} image(s) were given")
    return pieces
