"""
Prepare speed and memory on the same local corpus: this repository's data/fineweb/prepare.py and
data/openwebtext/prepare.py (both streamed, data/tokenize_corpus.py) against upstream nanoGPT's
data/openwebtext/prepare.py (the baseline), the same parquet shards (made here: pseudo-English documents of a few
KB, in row groups of 1,000) and the same num_proc, at two corpus sizes,
runs interleaved. Each run is the whole process, with a datasets cache of its own; reported: tokens/s (tokens
written / wall time), peak RSS of the process and its workers together (the sum of their PSS, polled every
0.1 s), and the extra disk each leaves beyond train.bin, val.bin and manifest.json (mostly datasets' cache). Medians.
nanoGPT's script hard-codes load_dataset("openwebtext") and num_proc = 8: it runs from a copy with num_proc
replaced (and its 1024 write batches capped at a split's documents), and a sitecustomize.py that redirects that
one load_dataset call to the local parquet shards.
$ python benchmarks/prepare_speed.py --nanogpt=../nanoGPT
$ python benchmarks/prepare_speed.py --nanogpt=../nanoGPT --sizes_mb=20,40 --num_proc=2 --repeats=3
"""

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import UserError, configure, report_errors  # noqa: E402

# -----------------------------------------------------------------------------
nanogpt = ''  # a checkout of karpathy/nanoGPT (required): the baseline runs its data/openwebtext/prepare.py
sizes_mb = '16,48'  # the two corpus sizes, MB of text
num_proc = 2  # workers of every prepare
repeats = 2  # runs of each prepare at each size, interleaved; medians are reported
shards = 4  # parquet files per corpus
# -----------------------------------------------------------------------------
# nanoGPT's lines changed in its copy: our num_proc, and no more write batches than a split has documents
# (its 1024 fail on a val split of fewer documents: 0.05% of a corpus below 2M documents)
PATCHES = {'num_proc = 8\n': 'num_proc = {num_proc}\n',
           '    total_batches = 1024\n': '    total_batches = min(1024, len(dset))\n'}
# nanoGPT's one call to the hub, sent to the local shards instead
REDIRECT = """
import os, datasets
_load_dataset = datasets.load_dataset
def load_dataset(path, *args, **kwargs):
    if path == 'openwebtext':
        return _load_dataset('parquet', data_files=os.environ['BENCH_SHARDS'].split(os.pathsep), **kwargs)
    return _load_dataset(path, *args, **kwargs)
datasets.load_dataset = load_dataset
"""


def write_corpus(folder, megabytes):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(megabytes)
    words = [''.join(rng.choice('etaoinshrdlucmfwypvbgkqjxz') for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    os.makedirs(folder)
    per_shard, paths = megabytes * 1_000_000 // shards, []
    for shard in range(shards):
        docs, size = [], 0
        while size < per_shard:
            doc = ' '.join(rng.choices(words, k=rng.randint(100, 1000))) + '.'
            docs.append(doc)
            size += len(doc)
        paths.append(os.path.join(folder, f'{shard:03d}_00000.parquet'))
        pq.write_table(pa.table({'text': docs}), paths[-1], row_group_size=1000)  # hub-like row groups
    return paths


def session_rss(sid):
    # bytes resident in the processes of the session (the prepare and its workers), shared pages split among them
    total = 0
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            if int(fields[3]) == sid:  # the session id, 6th field of stat
                with open(f'/proc/{pid}/smaps_rollup') as f:  # Pss: pages shared by forked workers counted once
                    total += 1024 * int(next(line for line in f if line.startswith('Pss:')).split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


def folder_bytes(folder, leave_out=()):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names
               if n not in leave_out)


def measured_run(cmd, cwd, env, out_dir, cache):
    """(tokens/s, peak RSS bytes, extra disk bytes) of one prepare."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, session_rss(proc.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[:2])} failed: {stderr.strip().splitlines()[-1:]}")
    outputs = ('train.bin', 'val.bin', 'manifest.json')
    tokens = sum(os.path.getsize(os.path.join(out_dir, n)) for n in outputs[:2]) // 2
    extra = folder_bytes(cache) + folder_bytes(out_dir, leave_out=outputs + ('prepare.py',))
    return tokens / wall, peak, extra


def commands(name, work, corpus, paths):
    """(command, cwd, extra environment, out_dir) of one prepare of the corpus."""
    out_dir = os.path.join(work, 'out', name)
    shutil.rmtree(out_dir, ignore_errors=True)
    if name == 'nanogpt':  # its script writes beside itself
        os.makedirs(out_dir)
        with open(os.path.join(nanogpt, 'data', 'openwebtext', 'prepare.py')) as f:
            source = f.read()
        for line, new in PATCHES.items():
            if line not in source:
                raise UserError(f"{nanogpt}/data/openwebtext/prepare.py has no line {line.strip()!r} to patch")
            source = source.replace(line, new.format(num_proc=num_proc), 1)
        with open(os.path.join(out_dir, 'prepare.py'), 'w') as f:
            f.write(source)
        site = os.path.join(work, 'site')
        os.makedirs(site, exist_ok=True)
        with open(os.path.join(site, 'sitecustomize.py'), 'w') as f:
            f.write(REDIRECT)
        env = {'PYTHONPATH': site, 'BENCH_SHARDS': os.pathsep.join(paths)}
        return [sys.executable, 'prepare.py'], out_dir, env, out_dir
    script = os.path.join(REPO, 'data', name, 'prepare.py')
    flags = ['--val_tokens=100000'] if name == 'fineweb' else []
    return [sys.executable, script, f'--dataset={corpus}', f'--num_proc={num_proc}', f'--out_dir={out_dir}',
            *flags], REPO, {}, out_dir


def main():
    if not nanogpt or not os.path.isfile(os.path.join(nanogpt, 'data', 'openwebtext', 'prepare.py')):
        raise UserError("--nanogpt=DIR must name a checkout of karpathy/nanoGPT (its data/openwebtext/prepare.py)")
    sizes = [int(s) for s in sizes_mb.split(',')]
    names = ('nanogpt', 'openwebtext', 'fineweb')
    work = tempfile.mkdtemp(prefix='prepare_speed-')
    results = {(name, size): [] for name in names for size in sizes}
    try:
        corpora = {size: write_corpus(os.path.join(work, f'corpus{size}'), size) for size in sizes}
        for repeat in range(repeats):
            for size in sizes:
                order = names if repeat % 2 == 0 else names[::-1]
                for name in order:
                    cache = os.path.join(work, 'cache')
                    shutil.rmtree(cache, ignore_errors=True)
                    cmd, cwd, extra_env, out_dir = commands(name, work, os.path.dirname(corpora[size][0]),
                                                            corpora[size])
                    env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1',
                               HF_DATASETS_DISABLE_PROGRESS_BARS='1', **extra_env)
                    results[name, size].append(measured_run(cmd, cwd, env, out_dir, cache))
                    rate, peak, extra = results[name, size][-1]
                    print(f"{name} {size} MB run {repeat + 1}: {rate / 1e6:.2f}M tokens/s, peak RSS {peak / 2**20:.0f} "
                          f"MiB, extra disk {extra / 2**20:.1f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{num_proc} workers, {repeats} interleaved run(s) each, medians; speed against nanoGPT's at the same size")
    print("| prepare | corpus | tokens/s | vs nanoGPT | peak RSS (MiB) | extra disk (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        for size in sizes:
            rate, peak, extra = (float(np.median(col)) for col in zip(*results[name, size]))
            base = float(np.median([r for r, _, _ in results['nanogpt', size]]))
            print(f"| {name} | {size} MB | {rate / 1e6:.2f}M | {rate / base:.2f}x | {peak / 2**20:.0f} | "
                  f"{extra / 2**20:.1f} |")


if __name__ == '__main__':
    report_errors()
    configure(globals())
    main()
