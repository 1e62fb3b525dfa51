from llmq.cli.app import main

main()
