"""``dcbg preview``: a picture of frames, backgrounds and corrected frames"""
from __future__ import annotations

from .output import emit


def cmd_preview(args) -> int:
    from ..preview import write_preview
    output = write_preview(args.path, args.output, args.events, args.row)
    emit(f"{output}")
    return 0


def add_parser(subcommands):
    """`dcbg preview` and its options"""
    preview = subcommands.add_parser(
        "preview", help="PNG of raw frames, backgrounds and corrected frames of a file")
    preview.add_argument("path", metavar="FILE", help=".rtdc file with image and image_bg")
    preview.add_argument("-e", "--event", dest="events", type=int, action="append",
                         metavar="EVENT", help="event to show (repeat, up to 10; default: "
                         "three with cells)")
    preview.add_argument("-o", "--output", help=".png, .jpg or .jpeg path, the suffix "
                         "chooses the format (default: <stem>_preview.png)")
    preview.add_argument("--row", type=int, help="pixel row of the time strip (default: "
                         "the middle row)")
    preview.add_argument("--verbose", action="store_true", help="show tracebacks")
    preview.set_defaults(func=cmd_preview)
