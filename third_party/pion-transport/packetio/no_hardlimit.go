// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

//go:build !packetioSizeHardlimit

package packetio

const sizeHardLimit = false
