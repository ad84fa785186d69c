"""`dopd inspect`: a record's rendered views and token counts, or (`--routing`) the routing page of
the student's answers to a few records."""

from __future__ import annotations

import re

from dopd_vl.cli.options import add_data_options, add_device_options, columns, data_image_roots, load_for_generation

_IMAGE_RUN = re.compile(r"<\|vision_start\|>((?:<\|image_pad\|>)+)<\|vision_end\|>")


def add_parser(commands) -> None:
    inspect = commands.add_parser("inspect", help="print a record's rendered views and token counts")
    inspect.add_argument(
        "--student", required=True, help="student model folder or hub id (its tokenizer / processor is used)"
    )
    inspect.add_argument("--teacher", help="teacher model folder or hub id (default: the student's)")
    inspect.add_argument("--data", required=True, help="dataset: JSONL, Parquet / Arrow file, dataset folder or id")
    add_data_options(inspect)
    inspect.add_argument("--index", type=int, default=0, help="record number in the file (0-based)")
    inspect.add_argument(
        "--routing",
        metavar="OUT.html",
        help="write the token routing view (needs model weights): the student answers "
        "records --index.. --index+--count-1 and every response token is coloured by its DOPD regime",
    )
    inspect.add_argument("--count", type=int, default=4, help="records in the routing view")
    inspect.add_argument("--max-new-tokens", type=int, default=32, help="response length cap for the routing view")
    inspect.add_argument("--seed", type=int, default=0, help="sampling seed for the routing view")
    add_device_options(inspect)
    inspect.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.data.sources import load_records
    from dopd_vl.errors import DatasetError
    from dopd_vl.method.views import PRIVILEGED_VIEWS, TEACHER_VIEWS, VIEWS
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import check_same_tokenizer, load_processing

    records = load_records(args.data, split=args.split, columns=columns(args.column))
    if not 0 <= args.index < len(records):
        raise DatasetError(
            f"--index {args.index} is out of range (the file has {len(records)} records)", file=args.data
        )
    record = records[args.index]
    root = data_image_roots(args)
    student = make_adapter(load_processing(args.student), image_root=root)
    teacher = make_adapter(load_processing(args.teacher), image_root=root) if args.teacher else student
    check_same_tokenizer(student.tokenizer, teacher.tokenizer)
    if args.routing:
        return _write_routing(args, records, root)
    print(f"record {record['id']}  ({args.data}, index {args.index})")
    for view in VIEWS:
        if view in PRIVILEGED_VIEWS and not record.get("privileged_context"):
            print(f"\n=== {view}: skipped (the record has no privileged_context)")
            continue
        prompt = (teacher if view in TEACHER_VIEWS else student).prompt(record, view)
        image_tokens = (
            int((prompt.extras["mm_token_type_ids"] == 1).sum()) if "mm_token_type_ids" in prompt.extras else 0
        )
        print(f"\n=== {view}: {prompt.input_ids.numel()} prompt tokens ({image_tokens} image tokens)")
        print(_IMAGE_RUN.sub(lambda m: "<|vision_start|>[image]<|vision_end|>", prompt.text))
    if record.get("answer") is not None:
        print(f"\n(answer, never shown to any view: {record['answer']})")
    return 0


def _write_routing(args, records: list[dict], root) -> int:
    import torch

    from dopd_vl.apps.routing_page import route_records, write_routing_html
    from dopd_vl.models.loading import check_same_tokenizer
    from dopd_vl.training.rollout import RolloutConfig, sample_responses

    chosen = records[args.index : args.index + args.count]
    student, s_proc, s_adapter, eos, never = load_for_generation(args.student, root, args.device, args.dtype)
    teacher, t_proc, t_adapter, _, _ = load_for_generation(args.teacher or args.student, root, args.device, args.dtype)
    vocab = check_same_tokenizer(s_proc, t_proc, student, teacher)
    torch.manual_seed(args.seed)
    rollout = sample_responses(
        student, s_adapter, chosen, RolloutConfig(num_generations=1, max_new_tokens=args.max_new_tokens), eos, never
    )
    routed, thresholds = route_records(
        student, teacher, {"student": s_adapter, "teacher": t_adapter}, chosen, rollout.responses, vocab
    )
    path = write_routing_html(args.routing, routed, thresholds, image_root=root)
    print(f"wrote the routing view of {len(routed)} records to {path}")
    return 0
