"""The `memlm` subcommands: one module per command, each `build_parser()` + `main(argv)`. Thin: parse the
flags, call one library function (train/ role packages, data/, memory/, model/), print the result."""
