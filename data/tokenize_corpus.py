"""
The engine of the GPT-2 corpus prepare scripts (data/openwebtext, data/fineweb): a corpus read one shard at a
time (local parquet files read with pyarrow, or a datasets.IterableDataset streamed from the hub or from local
json/text files), tokenized with the GPT-2 BPE by --num_proc worker processes a batch of documents at a time, and
appended, in the corpus's order, to files in the output folder. progress.json records after every shard how long
the files are, so a prepare stopped in any way (Ctrl-C, kill -9, a full disk) continues after its last recorded
shard and writes the same bytes as one that was never stopped. Nothing is written to datasets' cache.

Where the speed comes from: a worker gets its documents as an arrow array (a few buffers to pickle, not a Python
string each), tiktoken writes each document's ids into a numpy array (encode_to_numpy, no list of Python ints),
and a batch comes back as one uint16 array, appended to its file as it is.
"""
import collections
import concurrent.futures
import json
import os
import signal

import numpy as np
from tqdm import tqdm

from prepare_utils import UserError, gpt2_encoding, write_atomic

BATCH_DOCS = 1024  # documents per task sent to a worker
PROGRESS = 'progress.json'


# -----------------------------------------------------------------------------
# the workers: each turns a batch of documents into one array of token ids, every document ended by end-of-text

enc = None


def init_worker():
    global enc
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process to handle, once
    enc = gpt2_encoding()


def tokenize(texts):
    """(tokens, lengths, skipped) of an arrow array of documents: their uint16 ids one after another, the number
    of ids of each, and how many rows were skipped because their text was null or not a string."""
    eot = np.array([enc.eot_token], dtype=np.uint32)  # 50256 for gpt2
    pieces = []
    for text in texts.to_pylist():
        if isinstance(text, str):
            # disallowed_special=(): special tokens in the text are plain text, as encode_ordinary reads them
            pieces += (enc.encode_to_numpy(text, disallowed_special=()), eot)
    lengths = np.array([len(ids) + 1 for ids in pieces[::2]], dtype=np.int64)
    tokens = np.concatenate(pieces).astype(np.uint16) if pieces else np.empty(0, dtype=np.uint16)
    return tokens, lengths, len(texts) - len(lengths)


opened = None  # (path, ParquetFile) of the last parquet file a worker read: its footer is parsed once


def tokenize_row_group(path, row_group, column):
    global opened
    if opened is None or opened[0] != path:
        import pyarrow.parquet as pq
        opened = (path, pq.ParquetFile(path))
    return tokenize(opened[1].read_row_group(row_group, columns=[column]).column(0))


def start_workers(num_proc):
    """The tokenizing workers, started now, before this process reads any parquet (a fork copies only the thread
    that forks, and a reader's threads may hold locks); for num_proc=1 a thread of this process. Stopped with
    shutdown(cancel_futures=True): the tasks they run finish, so no worker dies holding a lock on a queue."""
    global enc
    enc = gpt2_encoding()  # loaded before the fork, so the workers inherit it
    if num_proc == 1:
        print("tokenizing in this process")
        return concurrent.futures.ThreadPoolExecutor(1)
    pool = concurrent.futures.ProcessPoolExecutor(num_proc, initializer=init_worker)
    pool.submit(int).result()  # the first task starts the workers (when forked, all of them)
    print(f"tokenizing in {num_proc} worker processes")
    return pool


# -----------------------------------------------------------------------------
# the corpus: shards, each a sequence of tasks for the workers, (function, arguments), in the order read

class ParquetShards:
    """Local parquet files, one shard each, read with pyarrow (no datasets, no cache)."""

    def __init__(self, paths, column):
        import pyarrow.parquet as pq
        self.paths, self.column, self.num_shards = paths, column, len(paths)
        self.rows = 0
        for path in paths:  # every file's footer now, so that a mistake stops the prepare before it begins
            try:
                schema, rows = pq.read_schema(path), pq.read_metadata(path).num_rows
            except Exception as e:  # pyarrow's errors for a file that is not parquet, or is cut short
                raise UserError(f"cannot read {path} as parquet ({str(e).strip() or type(e).__name__})") from None
            if column not in schema.names:
                raise UserError(f"{path} has no column {column!r}; its columns are: {', '.join(schema.names)}")
            if str(schema.field(column).type) not in ('string', 'large_string', 'string_view'):
                raise UserError(f"column {column!r} of {path} holds {schema.field(column).type}, not text")
            self.rows += rows

    def tasks(self, shard):
        import pyarrow.parquet as pq
        path = self.paths[shard]
        file = pq.ParquetFile(path)
        for i in range(file.num_row_groups):
            if file.metadata.row_group(i).num_rows <= 4 * BATCH_DOCS:
                yield tokenize_row_group, (path, i, self.column)  # read by the worker: only a name passes here
            else:  # a large row group (pyarrow's default is a million rows): read here, a batch at a time
                for batch in file.iter_batches(batch_size=BATCH_DOCS, row_groups=[i], columns=[self.column]):
                    yield tokenize, (batch.column(0),)


class StreamShards:
    """A datasets.IterableDataset (streaming=True), one shard per input file."""

    def __init__(self, stream, column):
        self.stream, self.column, self.num_shards = stream, column, stream.num_shards

    def tasks(self, shard):
        part = self.stream.shard(num_shards=self.num_shards, index=shard).with_format('arrow')
        for table in part.iter(batch_size=BATCH_DOCS):
            yield tokenize, (table.column(self.column),)


# -----------------------------------------------------------------------------

class Progress:
    """The files a prepare appends to, out_dir/NAME.partial for each name, and progress.json, which records after
    every shard how many shards are done, the files' sizes and the script's counts. Opened with a prepare's
    settings, it continues a recorded prepare of the same settings (cutting off what was appended after its last
    record), else starts from the beginning."""

    def __init__(self, out_dir, settings, names, counts):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, PROGRESS)
        self.paths = {name: os.path.join(out_dir, name + '.partial') for name in names}
        record = self.read(settings)
        if record is not None:
            for name, path in self.paths.items():  # stopped while publishing the finished files: take them back
                final = os.path.join(out_dir, name)
                published = record['finished'] and os.path.exists(final) and \
                    os.path.getsize(final) == record['sizes'][name]
                if not os.path.exists(path) and published:
                    os.replace(final, path)
            if not all(os.path.exists(path) and os.path.getsize(path) >= record['sizes'][name]
                       for name, path in self.paths.items()):
                print("the files of the interrupted prepare are gone or cut short; starting from the beginning")
                record = None
        self.resumed = record is not None
        self.record = record or {'settings': settings, 'shards_done': 0, 'finished': False,
                                 'sizes': dict.fromkeys(names, 0), 'counts': counts}
        self.counts = self.record['counts']
        self.files = {}
        try:
            for name, path in self.paths.items():
                self.files[name] = open(path, 'r+b' if self.resumed else 'wb')
                self.files[name].truncate(self.record['sizes'][name])  # what a stopped prepare wrote past its record
                self.files[name].seek(0, os.SEEK_END)
        except OSError as e:
            self.close()
            raise UserError(f"could not write to {out_dir} ({e.strerror or e})") from None

    def read(self, settings):
        if not os.path.exists(self.path):
            return None
        try:
            with open(self.path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or record.get('settings') != settings or 'sizes' not in record:
            print(f"{self.path} is from a prepare with other settings (or unreadable); starting from the beginning")
            return None
        return record

    def append(self, name, array):
        try:
            self.files[name].write(array)  # a numpy array is a buffer: written as its bytes, no copy
        except OSError as e:
            raise self.disk_error(e) from None

    def commit(self, shards_done, finished):
        """Record the first shards_done shards as written (finished: nothing is left to tokenize)."""
        try:
            for name, f in self.files.items():
                f.flush()
                os.fsync(f.fileno())  # on disk before the record that counts it
                self.record['sizes'][name] = f.tell()
            self.record.update(shards_done=shards_done, finished=finished)
            write_atomic(self.path, lambda f: f.write(json.dumps(self.record).encode()))
        except OSError as e:
            raise self.disk_error(e) from None

    def disk_error(self, e):
        return UserError(f"could not write to {self.out_dir} ({e.strerror or e}); free some space and run the same "
                         "command again to continue")

    def close(self):
        for f in self.files.values():
            f.close()

    def publish(self, name):
        """Rename a finished NAME.partial to NAME."""
        os.replace(self.paths[name], os.path.join(self.out_dir, name))

    def remove(self):
        """Once the outputs are whole: the record first (nothing left to resume), then any partial files left."""
        os.remove(self.path)
        for path in self.paths.values():
            if os.path.exists(path):
                os.remove(path)


def tokenized(source, progress, pool, num_proc):
    """(shard, tokens, lengths, skipped) of each batch of the corpus in order, from the first shard not recorded
    as done; after the last batch of a shard (which the caller has appended by then), records the shard done."""
    start = source.num_shards if progress.record['finished'] else progress.record['shards_done']
    if start:
        print(f"resuming after {start} of {source.num_shards} shards")
    # the batches in flight, oldest first, each with its shard; None marks a shard's end. At most a few: more
    # would read the corpus ahead of the workers, and memory would grow with it
    pending = collections.deque()
    with tqdm(desc="tokenizing shards", initial=start, total=source.num_shards) as bar:
        def oldest():
            shard, result = pending.popleft()
            if result is not None:
                yield (shard, *result.result())
                return
            progress.commit(shard + 1, finished=shard + 1 == source.num_shards)
            bar.update()

        for shard in range(start, source.num_shards):
            for function, args in source.tasks(shard):
                pending.append((shard, pool.submit(function, *args)))
                while len(pending) > 2 * num_proc:
                    yield from oldest()
            pending.append((shard, None))
        while pending:
            yield from oldest()
