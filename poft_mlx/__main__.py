"""`python -m poft_mlx` == `poft-mlx` (what `mlx.launch --python PYTHON -- -m poft_mlx ...` runs)."""

from poft_mlx.cli.main import main

main(prog_name="poft-mlx")
