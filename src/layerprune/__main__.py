from layerprune.app import main

main()
