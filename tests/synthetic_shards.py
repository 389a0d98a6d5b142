"""Synthetic shard sets written directly with `write_shard_set`: classes whose pixels say which
class and image they are (channel 0: class id, channel 1: image index), a different number of
images per class."""

import numpy as np

from fsl_dist.data import shards

SIZE = 16
# part -> images of each class; classes 0, 3 and 6 of train hold fewer than 5 images
COUNTS = {"train": [3, 10, 10, 4, 10, 10, 2, 10], "val": [6, 5, 7], "test": [5, 6, 9, 1]}


def labelled_images(class_id: int, count: int) -> np.ndarray:
    images = np.zeros((count, 3, SIZE, SIZE), np.uint8)
    images[:, 0] = class_id
    images[:, 1] = np.arange(count)[:, None, None]
    images[:, 2] = 200
    return images


def write_set(out, counts=COUNTS, classes_per_shard=3, dataset="synthetic"):
    parts, next_id = {}, 1
    for part in shards.PARTS:
        parts[part] = []
        for count in counts[part]:
            meta = {"id": next_id, "name": f"class{next_id:02d}", "part": part}
            parts[part].append(shards.ClassEntry(
                f"class{next_id:02d}", meta, lambda i=next_id, n=count: labelled_images(i, n)))
            next_id += 1
    header = {"dataset": dataset, "channels": 3, "image_size": SIZE, "rotate": False,
              "split_source": {"kind": "test"}}
    return shards.write_shard_set(out, parts, header, classes_per_shard=classes_per_shard)
