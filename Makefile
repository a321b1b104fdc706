.PHONY: test dev build
test:
	./scripts/test
dev:
	go run ./cmd/bastiond --dev
build:
	CGO_ENABLED=0 go build -trimpath -o bin/ ./cmd/...
