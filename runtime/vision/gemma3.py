"""Gemma 3 images: a numpy port of transformers' Gemma3ImageProcessorPil (pan-and-scan off),
Gemma3Processor (placeholder expansion) and get_block_sequence_ids_for_mask.

spec keys (written by the exporter into the manifest):
    family               "gemma3"
    image_token          "<start_of_image>", the placeholder a prompt holds for each image (boi token)
    image_token_id       id of "<image_soft_token>", the tokens the vision features replace
    full_image_sequence  "\\n\\n<start_of_image>" + tokens_per_image x "<image_soft_token>" + "<end_of_image>\\n\\n"
    tokens_per_image     256
    image_size           side of the square the vision tower takes (896)
    image_mean, image_std, rescale_factor
    resample             "bilinear"
"""
import numpy as np

from . import load_image, resized_normalized, split_placeholders


class Gemma3Images:
    def __init__(self, spec):
        self.spec = spec

    def request(self, texts: list, images: list):
        """(texts with placeholders expanded, vision graph inputs, state: the image count)."""
        flat = [image for row in images for image in row]
        expanded = [self.expand(text, len(row)) for text, row in zip(texts, images)]
        return expanded, {"pixel_values": self.pixels(flat)}, len(flat)

    def from_pixels(self, pixel_values, grids=None):
        """(vision graph inputs, state) for pixels already made, by HF's processor for example."""
        return {"pixel_values": pixel_values}, len(pixel_values)

    def encoder_patches(self, image) -> int:
        """Patches the vision tower sees for one image (for pop-bench's cost model): always the same."""
        return int(self.spec.encoder.patches_per_image)

    def image_tokens(self, num_images) -> int:
        return num_images * int(self.spec.tokens_per_image)

    def positions(self, ids, mask, state):
        return None, None  # one position axis: the text rule applies

    def pixels(self, images: list) -> np.ndarray:
        """Images -> float32 [num_images, 3, S, S], each squashed to S x S (aspect ratio not kept, as HF)."""
        size = self.spec.image_size
        return np.stack([resized_normalized(load_image(image), size, size, self.spec) for image in images])

    def expand(self, text: str, num_images: int) -> str:
        """Each image placeholder -> the full image sequence (boi, soft tokens, eoi, blank lines)."""
        pieces = split_placeholders(text, self.spec.image_token, num_images)
        return self.spec.full_image_sequence.join(pieces)

    def token_groups(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """int64 [B, N]: 0 for text and padding, g >= 1 for the g-th run of image soft tokens in a row.

        HF's get_block_sequence_ids_for_mask plus one: tokens of the same run attend to each
        other bidirectionally.
        """
        is_image = (np.asarray(ids) == self.spec.image_token_id) & (np.asarray(mask) != 0)
        follows_image = np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
        group = np.cumsum(is_image & ~follows_image, axis=1)
        return np.where(is_image, group, 0).astype(np.int64)
