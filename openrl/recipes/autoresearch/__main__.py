from openrl.recipes.autoresearch.main import main

main()
