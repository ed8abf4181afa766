from forge.host.cli import main

main()
