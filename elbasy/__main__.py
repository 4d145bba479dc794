from elbasy.cli import main

main()
