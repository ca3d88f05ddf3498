"""
Where a training run's numbers go besides the terminal: log.jsonl (one JSON row per logged iteration or
evaluation, appended across resumes), loss.png drawn from it, and optionally Weights & Biases.
"""

import json
import math
import os
import warnings

from configurator import UserError


class MetricsLog:
    """Appends rows to a JSON-lines file. On resume, rows from beyond the checkpoint (written by the run
    after its last save, and about to be repeated) are dropped so that every iteration appears once."""

    def __init__(self, path, resume_from=None, enabled=True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        try:
            if resume_from is not None and os.path.exists(path):
                rows = read_rows(path)
                kept = [r for r in rows if r['iter'] < resume_from or (r['iter'] == resume_from and 'val_loss' in r)]
                with open(path, 'w') as f:
                    f.writelines(json.dumps(r) + '\n' for r in kept)
            elif resume_from is None and os.path.exists(path):
                os.remove(path)  # a fresh run starts a fresh log
            open(path, 'a').close()  # a log that cannot be written fails now, not after the first iterations
        except OSError as e:
            raise UserError(f"cannot write the metrics log {path} ({e.strerror}); check the permissions of "
                            "out_dir or choose another --out_dir") from None

    def log(self, **row):
        """Append one row; values that are None (not measured yet) or not finite (strict JSON has no NaN) are
        left out."""
        if self.enabled:
            kept = {k: v for k, v in row.items() if v is not None and not (type(v) is float and not math.isfinite(v))}
            try:
                with open(self.path, 'a') as f:
                    f.write(json.dumps(kept, allow_nan=False) + '\n')
            except OSError as e:
                raise UserError(f"could not write the metrics log {self.path} ({e.strerror}); the last checkpoint "
                                "is intact: free some disk space or fix out_dir, then resume") from None


def read_rows(path):
    """The rows of a log; a line that does not parse (the torn last line of a killed run) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and 'iter' in row:
                rows.append(row)
    return rows


def plot_losses(log_path, png_path):
    """Train and val loss against iterations, learning rate on a second axis; below them, when logged, the
    training health: the gradient norm before clipping (clipped steps marked) and the share of steps clipped
    between evaluations. Written atomically."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no window: works on servers and in notebooks alike
    import matplotlib.pyplot as plt
    if not os.path.exists(log_path):
        return
    rows = read_rows(log_path)
    steps = [r for r in rows if 'loss' in r]
    evals = [r for r in rows if 'val_loss' in r]
    norms = [r for r in steps if 'grad_norm' in r]
    fig, axes = plt.subplots(2 if norms else 1, 1, figsize=(8, 8 if norms else 5), sharex=True, squeeze=False,
                             gridspec_kw={'height_ratios': [5, 3] if norms else [1]})
    ax = axes[0, 0]
    if steps:
        ax.plot([r['iter'] for r in steps], [r['loss'] for r in steps], color='tab:blue', alpha=0.4,
                linewidth=1, label='train loss (per iteration)')
    if evals:
        ax.plot([r['iter'] for r in evals], [r['train_loss'] for r in evals], 'o-', color='tab:blue',
                label='train loss (eval)')
        ax.plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o-', color='tab:orange',
                label='val loss (eval)')
    ax.set_ylabel('loss')
    ax.grid(alpha=0.3)
    lr_rows = steps or evals
    if lr_rows:
        ax2 = ax.twinx()
        ax2.plot([r['iter'] for r in lr_rows], [r['lr'] for r in lr_rows], color='tab:gray', linestyle='--',
                 linewidth=1, label='learning rate')
        ax2.set_ylabel('learning rate')
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = ax2.get_legend_handles_labels()
        ax.legend(lines + lines2, labels + labels2, loc='upper right')
    if norms:
        health = axes[1, 0]
        health.plot([r['iter'] for r in norms], [r['grad_norm'] for r in norms], color='tab:green', linewidth=1,
                    label='gradient norm before clipping')
        clipped = [r for r in norms if r.get('clipped')]
        health.plot([r['iter'] for r in clipped], [r['grad_norm'] for r in clipped], 'x', color='tab:red',
                    markersize=4, label='clipped step')
        health.set_yscale('log')
        health.set_ylabel('gradient norm')
        health.grid(alpha=0.3)
        fractions = [r for r in evals if 'clip_fraction' in r]
        lines, labels = health.get_legend_handles_labels()
        if fractions:
            share = health.twinx()
            share.plot([r['iter'] for r in fractions], [r['clip_fraction'] for r in fractions], 's--',
                       color='tab:purple', label='share of steps clipped since the last eval')
            share.set_ylim(-0.05, 1.05)
            share.set_ylabel('clipped share')
            more_lines, more_labels = share.get_legend_handles_labels()
            lines, labels = lines + more_lines, labels + more_labels
        health.legend(lines, labels, loc='upper right')
    axes[-1, 0].set_xlabel('iteration')
    fig.tight_layout()
    tmp = png_path + '.tmp.png'
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, png_path)
    except OSError as e:
        raise UserError(f"could not write the loss plot {png_path} ({e.strerror}); the last checkpoint is "
                        "intact: free some disk space or fix out_dir, then resume") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


class WandbRun:
    """Weights & Biases logging on the master process. A resumed run continues the same wandb run (its id
    is kept in the checkpoint); if wandb cannot start, training goes on with a warning."""

    def __init__(self, enabled, project, name, config, run_id=None):
        self.run = None
        self.run_id = run_id
        if not enabled:
            return
        try:
            import wandb
            self.run = wandb.init(project=project, name=name, config=config, id=run_id,
                                  resume='allow' if run_id else None)
            self.run_id = self.run.id
        except Exception as e:  # no network, no login, wrong key: none of them is worth losing a run over
            warnings.warn(f"wandb could not start ({type(e).__name__}: {e}); training continues without it")

    def log(self, step, values):
        if self.run is not None:
            try:
                self.run.log({k: v for k, v in values.items() if v is not None}, step=step)
            except Exception as e:
                warnings.warn(f"wandb logging failed ({e}); training continues without it")
                self.run = None

    def finish(self):
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # the checkpoint is already saved; a failed upload must not fail the run
                warnings.warn(f"wandb could not finish ({e}); run `wandb sync` on its directory to upload it")
            self.run = None
