// Package boottest boots the built appliance image (images/out) in qemu with
// software emulation and checks it from the outside the way a household's
// LAN sees it: the gateway's ports answer with the box's own CA, every other
// port stays silent, the firewall and the service hardening are in place,
// and the box powers off cleanly on the power button.
//
// It owns only the test; it never changes the image in images/out. What the
// test needs from inside the guest (iptables-save, listening sockets,
// device credentials) comes from a report unit that the test writes into its
// own copy of the disk with debugfs; the shipped image has no test hook.
//
// The test runs when BASTION_IMAGE_DIR names a directory made by
// images/build.sh; scripts/test.d/image.sh builds the image and sets it.
package boottest
