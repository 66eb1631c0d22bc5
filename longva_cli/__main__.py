from longva_cli.cli import main

main()
