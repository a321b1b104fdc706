.PHONY: test dev build image cross
test:
	./scripts/test
dev:
	go run ./cmd/bastiond --dev
build:
	CGO_ENABLED=0 go build -trimpath -o bin/ ./cmd/...
image:
	./images/build.sh
cross:
	./images/cross.sh
