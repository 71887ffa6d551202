"""`live2diff-engine styles list | path`."""

from __future__ import annotations


def add_parser(sub) -> None:
    st = sub.add_parser("styles", help="list the styles, or print where your styles file is")
    st.add_argument("action", choices=["list", "path"], nargs="?", default="list")
    st.add_argument("--styles", metavar="FILE", default=None)


def _cmd_styles(args) -> int:
    from ..styles import load_styles, user_styles_file

    if args.action == "path":
        print(user_styles_file())
        return 0
    from ..styles import fetch_hint

    for style in load_styles(args.styles).values():
        hint = fetch_hint(style)
        extras = []
        if style.dreambooth:
            extras.append(f"dreambooth {style.dreambooth}")
        extras += [f"lora {l.file}@{l.scale:g}" for l in style.loras]
        steps = f"t_index_list {list(style.t_index_list)}" if style.t_index_list else f"strength {style.strength}" if style.strength else "t_index_list [32, 45]"
        print(f"{style.name:12} {style.description}  [{'; '.join(extras + [steps, f'clip_skip {style.clip_skip}'])}]")
        if hint is not None:
            print(f"{'':12} missing: {'get it with `' + hint + '`' if hint.startswith('live2diff-engine') else hint}")
    return 0


COMMANDS = {"styles": (add_parser, _cmd_styles)}
