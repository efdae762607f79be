"""The tutorial's VAE exactly as printed, with one fix: its decoder's channel changes made consistent
(`VisualBlock(128, 64)` and `VisualBlock(64, 32)`; as printed, `VisualBlock(64)` receives 128 channels).

The package does not ship this file. It is the reference that tests and benchmarks hold `CustomVAE` against: same
parameter names, same outputs, and the explicit-softmax attention whose memory grows with the square of the tokens.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.projection = nn.Linear(embed_dim, embed_dim * 3)
        self.out_projection = nn.Linear(embed_dim, embed_dim)
        self.d_heads = embed_dim // num_heads

    def forward(self, x):
        batch_size, seq_len, dim = x.shape
        interim_shape = (batch_size, seq_len, self.num_heads, self.d_heads)
        q, k, v = self.projection(x).chunk(3, dim=-1)
        q, k, v = map(lambda t: t.reshape(interim_shape).transpose(1, 2), (q, k, v))
        weights = torch.matmul(q, k.transpose(-1, -2)) * (self.d_heads**-0.5)
        weights = F.softmax(weights, dim=-1)
        attention = torch.matmul(weights, v)
        attention = attention.transpose(1, 2).reshape(batch_size, seq_len, dim)
        return self.out_projection(attention)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=4):
        super().__init__()
        self.groupnorm = nn.GroupNorm(32, channels)
        self.attention = SelfAttention(channels, num_heads)
        self.residual_scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        residual = x.clone()
        x = self.groupnorm(x)
        batch_size, channels, height, width = x.shape
        x = x.view(batch_size, channels, height * width).transpose(1, 2)
        x = self.attention(x)
        x = x.transpose(1, 2).view(batch_size, channels, height, width)
        return x + residual * self.residual_scale


class VisualBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None):
        super().__init__()
        if out_channels is None:
            out_channels = in_channels
        self.groupnorm1 = nn.GroupNorm(32, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.groupnorm2 = nn.GroupNorm(32, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.residual_scale = nn.Parameter(torch.ones(1))
        self.identity = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, kernel_size=1)
        )

    def forward(self, x):
        residual = self.identity(x)
        x = self.groupnorm1(x)
        x = F.silu(x)
        x = self.conv1(x)
        x = self.groupnorm2(x)
        x = F.silu(x)
        x = self.conv2(x)
        return x + residual * self.residual_scale


class Encoder(nn.Module):
    def __init__(self, channels=3, latent_dim=4):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList([
            VisualBlock(32),
            VisualBlock(32),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
            VisualBlock(64),
            VisualBlock(64),
            nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1),
            VisualBlock(128),
            VisualBlock(128),
            nn.Conv2d(128, 128, kernel_size=3, stride=2, padding=1),
            VisualBlock(128),
            AttentionBlock(128),
            VisualBlock(128),
        ])  # fmt: skip
        self.norm_out = nn.GroupNorm(32, 128)
        self.conv_out = nn.Conv2d(128, 2 * latent_dim, kernel_size=3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm_out(x)
        x = F.silu(x)
        x = self.conv_out(x)
        mean, log_var = x.chunk(2, dim=1)
        return mean, log_var


class Decoder(nn.Module):
    def __init__(self, channels=3, latent_dim=4):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_dim, 128, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList([
            VisualBlock(128),
            AttentionBlock(128),
            VisualBlock(128),
            nn.Upsample(scale_factor=2),
            VisualBlock(128),
            VisualBlock(128),
            nn.Upsample(scale_factor=2),
            VisualBlock(128),
            VisualBlock(128, 64),  # printed as VisualBlock(64)
            nn.Upsample(scale_factor=2),
            VisualBlock(64),
            VisualBlock(64, 32),  # printed as VisualBlock(32)
            VisualBlock(32),
        ])  # fmt: skip
        self.norm_out = nn.GroupNorm(32, 32)
        self.conv_out = nn.Conv2d(32, channels, kernel_size=3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm_out(x)
        x = F.silu(x)
        x = self.conv_out(x)
        return x


class VAE(nn.Module):
    def __init__(self, channels=3, latent_dim=4):
        super().__init__()
        self.encoder = Encoder(channels, latent_dim)
        self.decoder = Decoder(channels, latent_dim)
        self.latent_dim = latent_dim

    def reparameterize(self, mean, log_var):
        std = torch.exp(0.5 * log_var)
        eps = torch.randn_like(std)
        return mean + std * eps

    def forward(self, x):
        mean, log_var = self.encoder(x)
        z = self.reparameterize(mean, log_var)
        x_recon = self.decoder(z)
        return x_recon, mean, log_var
