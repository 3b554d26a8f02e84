"""
Write report.md and its plots for a run, or compare runs side by side.

    python -m scripts.report                                  # the newest run
    python -m scripts.report --model-tag d24 --gpu-hour-cost 2.5
    python -m scripts.report --compare baseline my-idea       # the first run is the baseline
    python -m scripts.report --compare 'base-s*' 'idea-s*'    # groups over seeds: is the gain real?

The report: the run's configuration and horizon, training time and cost, val bpb and CORE next to
GPT-2's (with the rules and items they were measured with), samples and plots
($NANOCHAT_BASE_DIR/report.md, report/*.png). --compare prints final val bpb, CORE and training
time with the differences from the first run, overlays the val bpb curves, and warns where the
runs were not measured alike. Groups of seeds get mean ± std, each difference with its 95% interval
(Welch's t), a verdict, and the number of seeds that would resolve it.
"""
import sys

from nanochat.cli import ArgumentParser, run
from nanochat.compare import compare_runs
from nanochat.report import write_report


def main(argv=None):
    p = ArgumentParser("python -m scripts.report", __doc__)
    p.add_argument("--model-tag", default=None, help="run under base_checkpoints/ (default: the newest)")
    p.add_argument("--start-time", type=float, default=None,
                   help="epoch seconds the run started (default: the first stage start that speedrun.sh logged)")
    p.add_argument("--gpu-hour-cost", type=float, default=3.0, help="dollars per GPU-hour for the cost estimate")
    p.add_argument("--compare", nargs="+", metavar="GROUP", default=None,
                   help="compare runs instead; each GROUP is a run, or several runs of one configuration over seeds "
                        "(tags separated by commas, or a glob such as 'idea-s*'); the first is the baseline")
    args = p.parse_args(argv)
    if args.compare:
        return compare_runs(args.compare)
    print(write_report(model_tag=args.model_tag, start_time=args.start_time, gpu_hour_cost=args.gpu_hour_cost))


if __name__ == "__main__":
    sys.exit(run(main))
