"""Qwen3-VL images: a numpy port of transformers' Qwen2VLImageProcessorPil, Qwen3VLProcessor
(placeholder expansion) and the data-dependent parts of Qwen3VLModel / its vision tower.

spec keys (written by the exporter into the manifest):
    family                "qwen3_vl"
    image_token           "<|image_pad|>", the placeholder repeated once per merged patch
    image_token_id        its id
    vision_start_token_id id of "<|vision_start|>" (kept for the record; M-RoPE only looks at image tokens)
    patch_size            16
    temporal_patch_size   2: a still image is repeated to this many frames
    merge_size            2: merge_size**2 patches become one LLM token
    min_pixels, max_pixels  smart_resize bounds (HF's size["shortest_edge"], size["longest_edge"])
    image_mean, image_std, rescale_factor
    resample              "bicubic"
    num_grid_per_side     side of the learned position-embedding grid (sqrt of num_position_embeddings)
"""
import math

import numpy as np

from ..errors import PopError
from . import load_image, resized_normalized, split_placeholders


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """HF's smart_resize: sides divisible by factor, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise PopError(f"a {width}x{height} image is too elongated for Qwen3-VL (aspect ratio must be under 200)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen3VLImages:
    def __init__(self, spec):
        self.spec = spec
        self.patch = spec.patch_size
        self.merge = spec.merge_size
        self.temporal = spec.temporal_patch_size

    # ---- one request ------------------------------------------------------------------------

    def request(self, texts: list, images: list):
        """(texts with placeholders expanded, vision graph inputs, state for positions and counts);
        images: one non-empty-overall list per text."""
        patches, grids = self.pixels([image for row in images for image in row])
        expanded, start = [], 0
        for text, row in zip(texts, images):
            expanded.append(self.expand(text, grids[start:start + len(row)]))
            start += len(row)
        return expanded, {"pixel_values": patches, **self.vision_inputs(grids)}, grids

    def from_pixels(self, pixel_values, grids):
        """(vision graph inputs, state) for patches already made, by HF's processor for example."""
        grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
        return {"pixel_values": pixel_values, **self.vision_inputs(grids)}, grids

    def encoder_patches(self, image) -> int:
        """Patches the vision tower sees for one image (for pop-bench's cost model)."""
        return int(np.prod(self.pixels([image])[1][0]))

    def image_tokens(self, grids) -> int:
        return int(sum(self.tokens_per_image(g) for g in grids))

    def token_groups(self, ids, mask):
        return None  # Qwen3-VL's image tokens attend causally, like text

    # ---- pixels -------------------------------------------------------------------------

    def pixels(self, images: list):
        """Images -> (patches float32 [total_patches, C*Tp*p*p], grids int64 [num_images, 3] as t, h, w)."""
        patches, grids = [], []
        for image in images:
            image = load_image(image)
            height, width = smart_resize(image.height, image.width, self.patch * self.merge,
                                         self.spec.min_pixels, self.spec.max_pixels)
            flat, grid_h, grid_w = self._patchify(resized_normalized(image, height, width, self.spec))
            patches.append(flat)
            grids.append([1, grid_h, grid_w])
        return np.concatenate(patches, axis=0), np.array(grids, dtype=np.int64).reshape(-1, 3)

    def _patchify(self, image: np.ndarray):
        """[C, H, W] -> [grid_h*grid_w, C*Tp*p*p] in merge-block order, as HF's patchify."""
        p, m = self.patch, self.merge
        channels, height, width = image.shape
        grid_h, grid_w = height // p, width // p
        blocks = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        # A still image is its own every frame: the same patch repeated Tp times, inside each channel.
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], self.temporal, p, p))
        return frames.reshape(grid_h * grid_w, channels * self.temporal * p * p), grid_h, grid_w

    # ---- vision-graph inputs ---------------------------------------------------------------

    def vision_inputs(self, grids) -> dict:
        """What the exported vision graph takes in place of HF's data-dependent code.

        pos_index int64 [P, 4], pos_weight float32 [P, 4]: bilinear taps into the learned
            position grid (HF get_vision_interpolation_indices_and_weights, align_corners=True);
        rope_pos int64 [P, 2]: (row, col) of each patch for the vision rotary embedding;
        patch_image int64 [P]: the attention segment of each patch. Attention is block-diagonal
            per frame (HF cu_seqlens, merge_temporal=False); an image has one frame, so this
            is the image's index.
        """
        grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
        pos_index, pos_weight = self._interpolation(grids)
        return {"pos_index": pos_index, "pos_weight": pos_weight,
                "rope_pos": self._rope_positions(grids), "patch_image": self._segments(grids)}

    def _patch_rows_cols(self, grids: np.ndarray):
        """Row, column and image height/width of every patch, in merge-block order."""
        m = self.merge
        counts = grids.prod(axis=1)
        heights, widths = np.repeat(grids[:, 1], counts), np.repeat(grids[:, 2], counts)
        starts = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        within = (np.arange(counts.sum()) - starts) % (heights * widths)  # repeats over frames
        blocks_w = widths // m
        row = within // (m * m * blocks_w) * m + (within // m) % m
        col = (within // (m * m)) % blocks_w * m + within % m
        return row, col, heights, widths

    def _interpolation(self, grids: np.ndarray):
        side = self.spec.num_grid_per_side
        row, col, heights, widths = self._patch_rows_cols(grids)
        h_taps, h_weights = _bilinear_taps(row, heights, side)
        w_taps, w_weights = _bilinear_taps(col, widths, side)
        index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        return index.astype(np.int64), weight.astype(np.float32)

    def _rope_positions(self, grids: np.ndarray) -> np.ndarray:
        row, col, _, _ = self._patch_rows_cols(grids)
        return np.stack([row, col], axis=-1).astype(np.int64)

    def _segments(self, grids: np.ndarray) -> np.ndarray:
        frame_sizes = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
        return np.repeat(np.arange(len(frame_sizes)), frame_sizes).astype(np.int64)

    # ---- text side ---------------------------------------------------------------------------

    def tokens_per_image(self, grid) -> int:
        t, h, w = (int(v) for v in grid)
        return t * h * w // self.merge ** 2

    def expand(self, text: str, grids) -> str:
        """Each image placeholder -> as many image tokens as the image has merged patches (in order)."""
        pieces = split_placeholders(text, self.spec.image_token, len(grids))
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:]):
            out += [self.spec.image_token * self.tokens_per_image(grid), piece]
        return "".join(out)

    def positions(self, ids: np.ndarray, mask: np.ndarray, grids):
        """M-RoPE positions of a prefill: numpy port of Qwen3VLModel.get_rope_index (images only).

        ids, mask: int64 [B, N], mask 1 on real tokens (left padding 0). Returns position_ids
        int64 [3, B, N] (t, h, w axes; padded slots get 0 on every axis, as in HF) and deltas
        int64 [B] = max position + 1 - number of real tokens.

        Decoding: HF then gives each new token position cumsum(mask) - 1 + delta, the same on
        the 3 axes, i.e. a row's k-th real token (counting from 0, prompt included) sits at
        k + delta; text after the last image thus continues right after the image's positions.
        """
        ids, mask = np.asarray(ids), np.asarray(mask)
        batch, length = ids.shape
        position_ids = np.zeros((3, batch, length), dtype=np.int64)
        deltas = np.zeros(batch, dtype=np.int64)
        grids = iter(np.asarray(grids, dtype=np.int64).reshape(-1, 3))
        for b in range(batch):
            real = mask[b].astype(bool)
            row = self._row_positions(ids[b][real], grids)
            position_ids[:, b, real] = row
            deltas[b] = row.max() + 1 - real.sum() if row.size else 0
        if next(grids, None) is not None:
            raise PopError("more images were given than the prompt's image tokens account for")
        return position_ids, deltas

    def _row_positions(self, ids: np.ndarray, grids) -> np.ndarray:
        """[3, n] positions of one unpadded row: text counts up, each image run is a (t, h, w) grid."""
        chunks, current = [np.zeros((3, 0), dtype=np.int64)], 0
        for start, end, is_image in _runs(ids == self.spec.image_token_id):
            if not is_image:
                chunks.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
                continue
            grid = next(grids, None)
            if grid is None or end - start != self.tokens_per_image(grid):
                raise PopError(f"a run of {end - start} image tokens does not match the given images")
            chunks.append(self._image_positions(current, grid))
            current += max(grid[1], grid[2]) // self.merge
        return np.concatenate(chunks, axis=1)

    def _image_positions(self, start: int, grid) -> np.ndarray:
        t, h, w = int(grid[0]), int(grid[1]) // self.merge, int(grid[2]) // self.merge
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        return np.stack([tt, hh, ww]).reshape(3, -1) + start


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int):
    """Two taps per target index into a side-long table, align_corners=True, in HF's float32 steps."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets.astype(np.int64), 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets)
    return taps, np.maximum(np.float32(1) - distance, np.float32(0))


def _runs(flags: np.ndarray):
    """(start, end, flag) for each run of equal values."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [flags.size]])
    return [(int(s), int(e), bool(flags[s])) for s, e in zip(starts, ends)]
