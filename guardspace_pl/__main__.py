from guardspace_pl.cli import main

main()
