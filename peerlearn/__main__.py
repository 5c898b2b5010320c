from peerlearn.cli.main import main

main()
