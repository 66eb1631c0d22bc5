"""`longva recipes`: find, read and check the YAML recipes that training and benchmark commands take."""

from __future__ import annotations

from typing import Optional

import typer
import yaml

from longva_cli import options, recipes
from longva_cli.checks import read_text_file
from longva_cli.console import stderr, stdout

app = typer.Typer(
    help="""List, show and validate recipes (YAML settings files).

    A recipe holds every setting of one command (extend-text, align, niah); the command's flags
    and trailing key=value overrides change it for one run.

    examples:
      longva recipes list
      longva recipes show extend-text/tiny-cpu > my-recipe.yaml
      longva recipes validate my-recipe.yaml train.max_steps=10
    """,
    no_args_is_help=True,
)


@app.command("list")
def list_command() -> None:
    """List the bundled recipes with the first sentence of their description.

    examples:
      longva recipes list
    """
    from rich.table import Table

    table = Table("recipe", "what it is for", box=None)
    for path in recipes.bundled_recipes():
        table.add_row(recipes.bundled_name(path), recipes.summary(path))
    stdout.print(table)


@app.command("show")
def show_command(recipe: str = typer.Argument(..., help="A bundled name (extend-text/tiny-cpu) or a path.")) -> None:
    """Print a recipe file (its `command:` key included), e.g. to copy and edit it.

    examples:
      longva recipes show extend-text/qwen2-7b-224k > my-recipe.yaml
    """
    typer.echo(read_text_file(recipes.find_recipe(recipe), "recipe", max_bytes=recipes.MAX_RECIPE_BYTES), nl=False)


@app.command("validate")
def validate_command(
    recipe: str = typer.Argument(..., help="A bundled name (extend-text/tiny-cpu) or a path."),
    overrides: options.Overrides = None,
    command: Optional[str] = typer.Option(
        None, "--command", "-c", help="Check against this command's settings (extend-text, align, niah) instead of "
        "the one the recipe's `command:` key names."
    ),
) -> None:
    """Check a recipe (and overrides) as its command does before running; print the settings it gives.

    The checks are the command's own (types, ranges, files named), so what passes here starts,
    and what the command refuses is refused here with the same sentence.

    examples:
      longva recipes validate extend-text/tiny-cpu train.max_steps=5
      longva recipes validate my-recipe.yaml
      longva recipes validate old-recipe.yaml --command align
    """
    command, settings = recipes.validate(recipe, overrides or [], command)
    typer.echo(yaml.safe_dump({recipes.COMMAND_KEY: command, **recipes.to_dict(settings)}, sort_keys=False), nl=False)
    stderr.print(f"[green]Recipe {recipe} is well-formed for `longva {command}`.[/green]")
