// Package powercut holds the full-stack store-and-forward tests and the
// bridged benchmark: real bastiond processes between simulated devices
// and a real Mosquitto cloud broker. It owns no product code and is never
// imported; everything lives in its _test.go files.
package powercut
