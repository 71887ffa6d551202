"""One module per command: its subcommand (options, help, examples) in ``COMMANDS`` and its
function. `cli.py` builds the parser from them; nothing else imports this package."""
