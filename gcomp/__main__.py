from gcomp.cli import main

main()
