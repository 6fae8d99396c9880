"""Face crops for scoring one by one (`detect`, the web app), through the loader's own preprocessing.

The detector must see a face as training saw it: the shards hold each crop as a quality-95 JPEG
(pipeline.faces.encode_face_jpeg), and the loader decodes and resizes it with DALI. Here the same
JPEG round trip feeds the same DALI operations (pipeline.data.dali.image_ops), so a frame gives the
same tensor through `python -m shards` + the loader as through `detect` (tests/test_detect.py).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.faces import encode_face_jpeg


class FacePreprocessor:
    """RGB face crops -> [N, 3, S, S] float32 in [-1, 1] on `device`; not thread-safe (one per thread)."""

    def __init__(self, image_size: int, device: torch.device | str = "cpu", max_batch: int = 64, threads: int = 1):
        from nvidia.dali import fn, pipeline_def, types

        from pipeline.data.dali import SCORING_HW_DECODER_LOAD, decoder_args, image_ops

        self.device = torch.device(device)
        self.max_batch = max_batch
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        decoder = decoder_args(device_id is not None, SCORING_HW_DECODER_LOAD)

        @pipeline_def(batch_size=max_batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
        def pipeline():
            jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
            return image_ops(jpg, image_size, decoder, False, types.FLOAT, "CHW", 0)

        self._pipe = pipeline()
        self._pipe.build()

    def __call__(self, crops: list[np.ndarray]) -> torch.Tensor:
        from pipeline.data.dali import _to_torch

        out = []
        for start in range(0, len(crops), self.max_batch):
            jpegs = [np.frombuffer(encode_face_jpeg(c), np.uint8) for c in crops[start:start + self.max_batch]]
            self._pipe.feed_input("jpg", jpegs)
            (images,) = self._pipe.run()
            out.append(_to_torch(images, self.device).clone())  # DALI reuses its buffers on the next run
        return torch.cat(out)
