"""`longva recipes`: find, read and check the YAML recipes that training and benchmark commands take."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from longva_cli import recipes
from longva_cli.console import stderr

app = typer.Typer(help="List, show and validate recipes (YAML settings files).", no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """List the bundled recipes with the first line of their description.

    examples:
      longva recipes list
    """
    from rich.table import Table

    table = Table("recipe", "what it is for", box=None)
    for path in recipes.bundled_recipes():
        name = f"{path.parent.name}/{path.stem}"
        table.add_row(name, recipes.summary(path))
    stderr.print(table)


@app.command("show")
def show_command(recipe: str = typer.Argument(..., help="A bundled name (extend-text/tiny-cpu) or a path.")) -> None:
    """Print a recipe file, e.g. to copy and edit it.

    examples:
      longva recipes show extend-text/qwen2-7b-224k > my.yaml
    """
    typer.echo(recipes.find_recipe(recipe).read_text(), nl=False)


@app.command("validate")
def validate_command(
    recipe: str = typer.Argument(..., help="A bundled name or a path."),
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides to check with it."),
) -> None:
    """Check a recipe (and overrides) against its command's settings; print the result.

    examples:
      longva recipes validate recipes/extend-text/tiny-cpu.yaml train.max_steps=5
    """
    path = recipes.find_recipe(recipe)
    settings = recipes.load_recipe(recipes.schema_for(path), path, overrides or [])
    typer.echo(yaml.safe_dump(recipes.to_dict(settings), sort_keys=False), nl=False)
    stderr.print(f"[green]Recipe {Path(path)} is well-formed.[/green]")
