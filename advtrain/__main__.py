from advtrain.cli import main

main()
