"""Streaming input on Grain: datasets too large for memory, read record by record from files.

One job per module: `records` (the record format and DataSourceError), `sources` (the `Source`
protocol, ArrayRecordSource, ParquetSource, TokenFile) with `library_sources` (HFSource, TFDSSource,
open_source), `decode` (features -> model inputs), `batches` (the Grain pipelines). Import from here.

Sources (random access, opened lazily, picklable so Grain's worker processes can read them):
  * `ArrayRecordSource("data/train-*.array_record")`: ArrayRecord shards, one `encode_record` dict per
    record (what `depthlab data convert` writes);
  * `ParquetSource("data/*.parquet")`: one row per example, columns as features;
  * `HFSource("imagefolder", "photos/train")`: a Hugging Face `datasets` dataset from local files (parquet, json,
    csv, text, arrow, imagefolder);
  * `TFDSSource("cifar10", "train")`: a prepared TFDS split through `tfds.data_source` (no TensorFlow needed);
  * `TokenFile("data/train.bin")`: a nanoGPT-style flat file of uint16/uint32 token ids, read through a
    memory map as random windows.

Batches: `stream_batches(source, batch_size, seed, start_step)` is what `Experiment.train_batches` returns.
Batch i of a run is a pure function of (seed, i): the global order is Grain's seeded `IndexSampler` (a
fresh shuffle of every record each epoch, O(1) memory), so position p of the stream is record
`sampler[p].record_key`, and batch i holds positions [i * batch_size, (i + 1) * batch_size). The pipeline is
Grain's random-access `MapDataset` over step numbers, started at `start_step`, so a resumed run reads exactly
the batches an uninterrupted run would have read and no iterator state is checkpointed: the step is the
state. Decoding and augmentation (`decode(features)`, `transform(example, rng)` with an rng drawn from the
sampler for that position) run inside the step's element, hence in Grain's worker processes when
`num_workers > 0`; the batches do not depend on the number of workers.

Per-process sharding: with P processes, process p reads only rows [p * B / P, (p + 1) * B / P) of every
global batch (B / P records per step; its share of the dataset). The global batch does not depend on P.

Example:
    >>> source = ArrayRecordSource("data/train-*.array_record")
    >>> batches = stream_batches(source, 256, seed=0, start_step=1000, decode=ImageExample(),
    ...                          num_workers=2)
    >>> next(batches)["inputs"].shape        # (256, 32, 32, 3): this process's rows of global batch 1000
"""

from depthlab.train.optional import require
from depthlab.train.streaming.batches import (StreamIterator, grain_seed, stream_batches, stream_eval_batches,
                                              token_batches)
from depthlab.train.streaming.decode import ImageExample, decode_image, read_decoded, stack_examples, takes_where
from depthlab.train.streaming.library_sources import HFSource, TFDSSource, open_source
from depthlab.train.streaming.records import DataSourceError, decode_record, encode_record, first_line
from depthlab.train.streaming.sources import (ArrayRecordSource, ParquetSource, Shards, Source, TokenFile,
                                              check_nonempty, expand_paths)

__all__ = [
    "ArrayRecordSource", "DataSourceError", "HFSource", "ImageExample", "ParquetSource", "Shards", "Source",
    "StreamIterator", "TFDSSource", "TokenFile", "check_nonempty", "decode_image", "decode_record",
    "encode_record", "expand_paths", "first_line", "grain_seed", "open_source", "read_decoded", "require",
    "stack_examples", "stream_batches", "stream_eval_batches", "takes_where", "token_batches",
]
