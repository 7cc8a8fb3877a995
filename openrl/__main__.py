from openrl.cli import main

main()
